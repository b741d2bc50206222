"""Genome serialization and the search space: sampling, variation, repair, validation, encoding.

Spaces are built from ``conf/search_space/*.yaml`` (as ``ee_nas.run`` builds them) so the tests follow the configs.
"""
import numpy as np
import pytest
from omegaconf import OmegaConf

from ee_nas.genome import BRANCH_OPS, POOL_OPS, BranchLayer, ExitBranch, Genome
from ee_nas.search.space import SearchSpace

SPACES = ("aebnas", "placement_only", "fixed")
BACKBONES = ("mobilenetv3_small", "resnet")


@pytest.fixture(scope="module")
def spaces(backbones, make_space):
    return {(b, s): make_space(backbones[b], s) for b in BACKBONES for s in SPACES}


def space_kwargs(conf_dir, name, **overrides):
    cfg = OmegaConf.to_container(OmegaConf.load(conf_dir / "search_space" / f"{name}.yaml"))
    cfg.pop("_target_")
    return cfg | overrides


# -- Genome -------------------------------------------------------------------------------------------

def example_genome():
    return Genome(depths=[1, 2, 2, 1], expands=[2, 3, 4, 2, 3, 4, 2, 3], kernels=[3, 5, 3, 5, 3, 5, 3, 5],
                  exits=[ExitBranch(4, (BranchLayer("maxpool"), BranchLayer("mbconv6", 32))),
                         ExitBranch(0, (BranchLayer("dwsep3x3", 16),)),
                         ExitBranch(2, ())])


def test_genome_normalizes_and_orders():
    g = example_genome()
    assert g.taps == (0, 2, 4) and g.n_exits == 4
    assert all(isinstance(e, float) for e in g.expands)
    assert g.exits[2].layers[0].width == 0  # pooling keeps its input width
    assert hash(g) == hash(example_genome()) and g == example_genome()


def test_genome_yaml_round_trip(tmp_path, spaces):
    genomes = [example_genome()]
    rng = np.random.default_rng(0)
    for space in spaces.values():
        genomes += [space.sample(rng) for _ in range(5)]
    for i, g in enumerate(genomes):
        path = g.save(tmp_path / "sub" / f"arch{i}.yaml")
        loaded = Genome.load(path)
        assert loaded == g and loaded.key() == g.key()
    assert not list(tmp_path.rglob("*.tmp"))


def test_genome_load_accepts_wrapped_and_rejects_bad(tmp_path):
    g = example_genome()
    (tmp_path / "wrapped.yaml").write_text("genome:\n" + "".join(f"  {l}\n" for l in g.to_yaml().splitlines()))
    assert Genome.load(tmp_path / "wrapped.yaml") == g
    (tmp_path / "bad.yaml").write_text(g.to_yaml() + "colour: red\n")
    with pytest.raises(ValueError, match="colour"):
        Genome.load(tmp_path / "bad.yaml")
    with pytest.raises(FileNotFoundError):
        Genome.load(tmp_path / "missing.yaml")


def test_genome_rejects_malformed():
    with pytest.raises(ValueError, match="unknown branch op 'conv9x9'"):
        BranchLayer("conv9x9", 16)
    with pytest.raises(ValueError, match="positive width"):
        BranchLayer("conv3x3", 0)
    with pytest.raises(ValueError, match="same tap"):
        Genome([1], [2.0], [3], [ExitBranch(0), ExitBranch(0)])
    with pytest.raises(ValueError, match="expand ratio and one kernel"):
        Genome([2], [2.0, 3.0], [3])


# -- sampling, variation, repair ---------------------------------------------------------------------

@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("name", SPACES)
def test_sampled_mutated_crossed_genomes_are_valid(spaces, backbone, name):
    space = spaces[backbone, name]
    fill = (BranchLayer(next(op for op in ("maxpool", "avgpool", "dwsep3x3", "conv3x3", "mbconv3", "mbconv6")
                             if op in space.ops), space.widths[0]),) * space.min_layers
    keys = set()
    for seed in (0, 1, 2):
        rng = np.random.default_rng(seed)
        pop = [space.sample(rng) for _ in range(60)]
        for g in pop:
            assert space.problems(g) == [], g
            keys.add(g.key())
        for i, g in enumerate(pop):
            for prob in (0.1, 0.5, 1.0):
                child = space.mutate(g, rng, prob)
                assert space.problems(child) == [], (g, child)
                keys.add(child.key())
            a, b = g, pop[(i + 1) % len(pop)]
            child = space.crossover(a, b, rng)
            assert space.problems(child) == [], (a, b, child)
            for k in ("depths", "expands", "kernels"):  # every backbone gene comes from a parent
                assert all(c in (u, v) for c, u, v in zip(getattr(child, k), getattr(a, k), getattr(b, k)))
            parents = set(a.exits) | set(b.exits)
            assert all(e in parents or e.layers == fill for e in child.exits)  # or a repair fill-in
        if not space.is_fixed:  # mutation does change genomes
            assert sum(space.mutate(g, rng, 0.5) != g for g in pop) > len(pop) // 2
    if space.is_fixed:
        assert len(keys) == 1 and keys == {space.default_genome().key()}
    else:
        assert len(keys) > 300  # variety: the validity above is not the same genome over and over


@pytest.mark.parametrize("backbone", BACKBONES)
def test_samples_span_the_space(spaces, backbone):
    space = spaces[backbone, "aebnas"]
    rng = np.random.default_rng(0)
    pop = [space.sample(rng) for _ in range(300)]
    assert {len(g.exits) for g in pop} == set(range(space.min_exits, space.max_exits + 1))
    assert {l.op for g in pop for e in g.exits for l in e.layers} == set(space.ops) == set(BRANCH_OPS)
    assert {len(e.layers) for g in pop for e in g.exits} == set(range(space.min_layers, space.max_layers + 1))
    assert {t for g in pop for t in g.taps} == set(space.candidate_taps)
    for s in range(len(space.stage_depths)):
        assert {g.depths[s] for g in pop} == set(range(space.min_depth, space.stage_depths[s] + 1))
    fixed_bb = spaces[backbone, "placement_only"]
    assert {fixed_bb.sample(rng).exits[0].layers for _ in range(20)} == {(BranchLayer("dwsep3x3", 32),)}


@pytest.mark.parametrize("name", SPACES)
def test_repair_fixes_what_variation_breaks(spaces, name):
    space = spaces["mobilenetv3_small", name]
    g = space.largest()  # an exit at every active tap: more than max_exits
    assert space.problems(g) != [] or len(space.candidate_taps) == space.max_exits
    repaired = space.repair(g)
    assert space.min_exits <= len(repaired.exits) <= space.max_exits
    assert repaired.taps == g.taps[: space.max_exits]  # keeps the earliest
    no_exits = Genome(g.depths, g.expands, g.kernels)
    filled = space.repair(no_exits)
    assert len(filled.exits) == space.min_exits and space.problems(filled) == []


# -- encoding ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("key", [(b, s) for b in BACKBONES for s in SPACES])
def test_encode_decode_round_trip(spaces, key):
    space = spaces[key]
    lo, hi = space.bounds()
    assert len(lo) == len(hi) == space.n_var
    rng = np.random.default_rng(3)
    genomes = [space.sample(rng) for _ in range(100)]
    genomes += [space.mutate(g, rng, 0.5) for g in genomes[:50]] + [space.default_genome()]
    codes = set()
    for g in genomes:
        x = space.encode(g)
        assert x.shape == (space.n_var,) and np.all(lo <= x) and np.all(x <= hi)
        assert space.decode(x) == g
        codes.add(x.tobytes())
    assert len(codes) == len({g.key() for g in genomes})  # distinct genomes, distinct codes


# -- validation ----------------------------------------------------------------------------------------

def test_validate_names_the_reason(spaces):
    space = spaces["mobilenetv3_small", "aebnas"]
    good = space.sample(np.random.default_rng(0))
    assert space.validate(good) is good
    full = space.largest()
    layer = (BranchLayer("conv3x3", 16),)

    def with_exits(*exits, base=full):
        return Genome(base.depths, base.expands, base.kernels, list(exits))

    too_many = with_exits(*[ExitBranch(t, layer) for t in range(space.max_exits + 1)])
    with pytest.raises(ValueError, match=f"{space.max_exits + 1} early exits, valid"):
        space.validate(too_many)
    with pytest.raises(ValueError, match="0 early exits"):
        space.validate(with_exits())  # min_exits is 1
    with pytest.raises(ValueError, match="layer conv3x3/24 not in"):
        space.validate(with_exits(ExitBranch(0, (BranchLayer("conv3x3", 24),))))
    with pytest.raises(ValueError, match="3 layers, valid 0..2"):
        space.validate(with_exits(ExitBranch(0, layer * 3)))
    last = space.n_blocks - 1
    with pytest.raises(ValueError, match=f"tap {last} is not an active candidate tap"):  # the final block
        space.validate(with_exits(ExitBranch(last, layer)))
    too_deep = Genome([full.depths[0] + 1] + list(full.depths[1:]), full.expands, full.kernels, [ExitBranch(0, layer)])
    with pytest.raises(ValueError, match=f"depth of stage 0 is {full.depths[0] + 1}, valid 1..{full.depths[0]}"):
        space.validate(too_deep)
    too_shallow = Genome([1, 0] + list(full.depths[2:]), full.expands, full.kernels, [ExitBranch(0, layer)])
    with pytest.raises(ValueError, match="depth of stage 1 is 0"):
        space.validate(too_shallow)
    bad_kernel = Genome(full.depths, full.expands, (7,) + full.kernels[1:], [ExitBranch(0, layer)])
    with pytest.raises(ValueError, match="block 0: expand 4.0 / kernel 7"):
        space.validate(bad_kernel)
    with pytest.raises(ValueError, match="stages"):
        space.validate(Genome([1, 2], full.expands, full.kernels))

    placement = spaces["mobilenetv3_small", "placement_only"]
    with pytest.raises(ValueError, match="layer conv3x3/32 not in ops \\['dwsep3x3'\\]"):
        placement.validate(with_exits(ExitBranch(0, (BranchLayer("conv3x3", 32),))))
    fixed = spaces["mobilenetv3_small", "fixed"]
    g = fixed.default_genome()
    assert fixed.validate(g) is g
    smaller = Genome(g.depths, (2.0,) + g.expands[1:], g.kernels, g.exits)
    with pytest.raises(ValueError, match="keeps the backbone fixed"):
        fixed.validate(smaller)
    with pytest.raises(ValueError, match="tap 3 is not an active candidate tap \\[2, 5\\]"):
        fixed.validate(Genome(g.depths, g.expands, g.kernels, [ExitBranch(3, g.exits[0].layers), g.exits[1]]))


@pytest.mark.parametrize("overrides, match", [
    (dict(exit_taps=[2, 99]), "exit_taps"),
    (dict(exit_taps=[7]), "exit_taps"),  # the last block feeds the final classifier
    (dict(exit_taps=[-1, 2]), "exit_taps"),
    (dict(exit_taps=[2, 2]), "exit_taps"),
    (dict(exit_taps=[1, 2], max_exits=3), "max_exits"),
    (dict(min_exits=3, max_exits=2), "min_exits"),
    (dict(min_exits=-1), "min_exits"),
    (dict(branch=dict(ops=["conv3x3"], widths=[16], min_layers=2, max_layers=1)), "min_layers"),
    (dict(branch=dict(ops=["conv9x9"], widths=[16])), "branch.ops"),
    (dict(branch=dict(ops=[], widths=[16])), "branch.ops"),
    (dict(branch=dict(ops=["conv3x3"], widths=[0, 16])), "branch.widths"),
])
def test_bad_space_configs_raise(backbones, conf_dir, overrides, match):
    with pytest.raises(ValueError, match=match):
        SearchSpace(backbones["mobilenetv3_small"], **space_kwargs(conf_dir, "aebnas", **overrides))


def test_space_from_yaml_kwargs_equals_instantiated(backbones, conf_dir, spaces):
    """The yaml is the single source: building from its plain kwargs gives the same space."""
    for name in SPACES:
        a = SearchSpace(backbones["resnet"], **space_kwargs(conf_dir, name))
        b = spaces["resnet", name]
        assert (a.candidate_taps, a.ops, a.widths, a.n_var) == (b.candidate_taps, b.ops, b.widths, b.n_var)


# -- training subnets and fixed spaces -----------------------------------------------------------------

@pytest.mark.parametrize("key", [(b, s) for b in BACKBONES for s in SPACES])
def test_training_genomes_sandwich(spaces, key):
    space = spaces[key]
    largest, smallest = space.largest(), space.smallest()
    assert largest.depths == tuple(space.stage_depths)
    assert set(largest.expands) == {max(space.expand_choices)} and set(largest.kernels) == {max(space.kernel_choices)}
    assert largest.taps == tuple(space.active_taps(largest.depths))  # a branch at every tap it has
    assert all(len(e.layers) == space.max_layers for e in largest.exits)
    if space.search_backbone:
        assert smallest.depths == (space.min_depth,) * len(space.stage_depths)
        assert set(smallest.expands) == {min(space.expand_choices)}
    assert all(len(e.layers) == space.min_layers for e in smallest.exits)
    genomes = space.training_genomes(np.random.default_rng(0), n_random=4)
    keys = [g.key() for g in genomes]
    top = genomes[0]  # the largest backbone, its branches drawn like a random subnet's
    assert (top.depths, top.expands, top.kernels) == (largest.depths, largest.expands, largest.kernels)
    assert smallest.key() in keys
    assert len(set(keys)) == len(keys)
    for g in genomes:  # every training subnet has a branch at every active tap (each step trains each tap)
        assert g.taps == tuple(space.active_taps(g.depths))


def test_is_fixed_only_for_the_fixed_config(spaces, backbones, conf_dir):
    for (backbone, name), space in spaces.items():
        assert space.is_fixed == (name == "fixed"), (backbone, name)
    # one degree of freedom left is enough to make it a search space
    loose = [dict(max_exits=2, min_exits=1), dict(branch=dict(ops=["dwsep3x3"], widths=[16, 32], min_layers=1,
                                                             max_layers=1)),
             dict(search_backbone=True), dict(exit_taps=[2, 5, 6], min_exits=2, max_exits=2)]
    for overrides in loose:
        assert not SearchSpace(backbones["resnet"], **space_kwargs(conf_dir, "fixed", **overrides)).is_fixed
    pool_only = dict(branch=dict(ops=["avgpool"], widths=[16, 32], min_layers=1, max_layers=1))
    assert SearchSpace(backbones["resnet"], **space_kwargs(conf_dir, "fixed", **pool_only)).is_fixed


@pytest.mark.parametrize("backbone", BACKBONES)
def test_fixed_default_genome(spaces, backbone):
    space = spaces[backbone, "fixed"]
    g = space.default_genome()
    assert g.taps == (2, 5) and space.problems(g) == []
    assert all(e.layers == (BranchLayer("dwsep3x3", 32),) for e in g.exits)
    assert g.depths == tuple(space.stage_depths)


def test_pool_ops_have_no_width():
    assert all(BranchLayer(op, 32).width == 0 for op in POOL_OPS)
