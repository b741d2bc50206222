"""TorchScript and ONNX export of every segment and head: same outputs (1e-5) and same exits as eager."""
import json
import shutil

import numpy as np
import pytest
import torch
import yaml
from omegaconf import OmegaConf
from PIL import Image
from torch import nn

from ee_nas.infer import main as infer_main
from ee_nas.inference.export import ExportedRuntime, export_net, export_run
from ee_nas.inference.fold import fold_batchnorm
from ee_nas.inference.runtime import EarlyExitRuntime, load_run
from ee_nas.models.multi_exit import MultiExitSupernet
from ee_nas.genome import BranchLayer, ExitBranch, Genome
from ee_nas.thresholds.confidence import confidence

GENOME = Genome(depths=(1, 2, 2), expands=(2.0, 4.0, 4.0, 2.0, 3.0, 4.0, 2.0), kernels=(5, 3, 5, 3, 5, 3, 5),
                exits=[ExitBranch(0, (BranchLayer("mbconv6", 16), BranchLayer("maxpool"))),
                       ExitBranch(3, (BranchLayer("dwsep3x3", 32),))])


@pytest.fixture(scope="module")
def net(make_backbone, make_space):
    torch.manual_seed(0)
    backbone = make_backbone("mobilenetv3_small", image_size=16, in_channels=1)
    net = MultiExitSupernet(backbone, make_space(backbone, "aebnas")).extract(GENOME)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            if isinstance(m, nn.Linear):
                m.weight.mul_(4.0)
    return net.eval()


@pytest.fixture(scope="module")
def images():
    return torch.randn(40, 1, 16, 16, generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def thresholds(net, images):
    with torch.no_grad():
        conf = confidence(torch.stack(net(images), 1))
    return np.array([np.median(conf[:, 0]), np.median(conf[:, 1]), 0.0])


@pytest.fixture(scope="module")
def exported(net, thresholds, tmp_path_factory):
    return export_net(net, tmp_path_factory.mktemp("export"), (1, 16, 16), thresholds, "max_softmax")


def test_export_layout_and_thresholds_json(exported, thresholds):
    meta = json.loads((exported / "thresholds.json").read_text())
    assert meta["n_exits"] == 3 and meta["measure"] == "max_softmax" and meta["input_shape"] == [1, 16, 16]
    assert meta["thresholds"] == pytest.approx([float(thresholds[0]), float(thresholds[1]), 0.0])
    for k in range(3):
        for suffix in (".pt", ".onnx"):
            assert (exported / f"segment_{k}{suffix}").is_file() and (exported / f"head_{k}{suffix}").is_file()


@pytest.mark.parametrize("backend", ["torchscript", "onnx"])
def test_segments_and_heads_match_eager(net, exported, images, backend):
    rt = ExportedRuntime(exported, backend)
    for n in (1, 7):  # dynamic batch size
        x = images[:n]
        ex = x.numpy() if backend == "onnx" else x
        with torch.no_grad():
            for k, (segment, head) in enumerate(zip(net.segments, net.heads)):
                x, ex = segment(x), rt._segment(k, ex)
                np.testing.assert_allclose(np.asarray(ex), x.numpy(), atol=1e-5)
                np.testing.assert_allclose(rt._head(k, ex), head(x).numpy(), atol=1e-5)


@pytest.mark.parametrize("backend", ["torchscript", "onnx"])
def test_exported_runtime_exits_like_eager(net, exported, images, thresholds, backend):
    eager = EarlyExitRuntime(net, thresholds).classify(images)
    assert len(np.unique(eager.exits)) == 3
    rt = ExportedRuntime(exported, backend, threads=1)
    ours = rt.classify(images)
    np.testing.assert_array_equal(ours.exits, eager.exits)
    np.testing.assert_array_equal(ours.labels, eager.labels)
    np.testing.assert_allclose(ours.logits, eager.logits, atol=1e-5)
    one = rt.classify(images[5])
    assert (one.exits[0], one.labels[0]) == (eager.exits[5], eager.labels[5])


def test_bad_backend_and_directory(exported, tmp_path, net):
    with pytest.raises(ValueError, match="backend='tflite'"):
        ExportedRuntime(exported, "tflite")
    with pytest.raises(FileNotFoundError, match="not an ee_nas export directory"):
        ExportedRuntime(tmp_path)
    only_ts = export_net(net, tmp_path / "ts", (1, 16, 16), [0.5, 0.5], "max_softmax", backends=["torchscript"])
    with pytest.raises(ValueError, match="no onnx export"):
        ExportedRuntime(only_ts, "onnx")


@pytest.fixture(scope="module")
def run_dir(net, thresholds, tmp_path_factory, conf_dir):
    """A run directory as `ee_nas.run` leaves it (.hydra/config.yaml, arch.yaml, subnet.pt), no training."""
    run_dir = tmp_path_factory.mktemp("run")
    cfg = OmegaConf.create({
        "data": {"_target_": "ee_nas.data.digits.DigitsDataModule", "image_size": 16, "mean": [0.3], "std": [0.3]},
        "backbone": OmegaConf.load(conf_dir / "backbone" / "mobilenetv3_small.yaml"),
        "search_space": OmegaConf.load(conf_dir / "search_space" / "aebnas.yaml"),
    })
    (run_dir / ".hydra").mkdir()
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    (run_dir / "arch.yaml").write_text(yaml.safe_dump(GENOME.to_dict()))
    torch.save({"genome": GENOME.to_dict(), "state_dict": net.state_dict(), "thresholds": thresholds,
                "measure": "max_softmax"}, run_dir / "subnet.pt")
    return run_dir


def test_export_run_writes_into_the_run_dir(run_dir, images):
    out = export_run(run_dir, backends=["onnx"])
    assert out == run_dir / "export"
    meta = json.loads((out / "thresholds.json").read_text())
    assert meta["genome"] == GENOME.to_dict() and meta["mean"] == [0.3]
    eager = EarlyExitRuntime.from_run_dir(run_dir).classify(images)
    np.testing.assert_array_equal(ExportedRuntime(out, "onnx").classify(images).exits, eager.exits)


def test_infer_cli_prints_class_exit_and_confidence(run_dir, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (8 + i, 8), dtype=np.uint8)).save(folder / f"img{i}.png")
    Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(folder / "rgb.jpg")
    outputs = {}
    for backend in ("eager", "torchscript", "onnx"):
        code = infer_main([f"run_dir={run_dir}", f"input={folder}", f"backend={backend}",
                           f"export_dir={tmp_path / 'exp'}"])
        outputs[backend] = capsys.readouterr().out.strip().splitlines()
        assert code == 0 and len(outputs[backend]) == 7
    assert outputs["eager"] == outputs["torchscript"] == outputs["onnx"]
    import ee_nas.inference.runtime as runtime

    folds = []
    monkeypatch.setattr(runtime, "fold_batchnorm", lambda n: folds.append(n) or fold_batchnorm(n))
    assert infer_main([f"run_dir={run_dir}", f"input={folder}", "fold_bn=true"]) == 0
    assert len(folds) == 1  # the flag reaches the runtime
    folded = capsys.readouterr().out.strip().splitlines()
    assert [line.rsplit(" confidence ", 1)[0] for line in folded] == \
        [line.rsplit(" confidence ", 1)[0] for line in outputs["eager"]]  # the same class and exit per file
    assert all(" class " in line and " exit " in line and " confidence " in line for line in outputs["eager"])
    assert infer_main([f"run_dir={run_dir}", f"input={folder / 'img0.png'}"]) == 0
    assert capsys.readouterr().out.startswith(str(folder / "img0.png"))


@pytest.mark.parametrize("args, match", [
    (["input=x.png"], "missing run_dir"),
    (["run_dir=r", "input=x", "backend=tflite"], "backend='tflite'"),
    (["run_dir=r", "input=x", "colour=1"], "key one of run_dir"),
    (["run_dir=r", "input=x", "backend=onnx", "fold_bn=true"], "fold_bn=true is for backend=eager"),
])
def test_infer_cli_usage_errors(args, match, capsys):
    assert infer_main(args) == 2
    assert match in capsys.readouterr().err


@pytest.fixture
def tail_run_dir(run_dir, net, images, tmp_path):
    """`run_dir` with val outputs (`images`) and thresholds under which no val image reaches the final exit."""
    out = shutil.copytree(run_dir, tmp_path / "run")
    with torch.no_grad():
        logits = torch.stack(net(images), 1).numpy()
    conf = confidence(logits)
    t0 = np.median(conf[:, 0])
    t1 = conf[conf[:, 0] < t0, 1].min()  # every val image that reaches exit 1 leaves there
    torch.save({"genome": GENOME.to_dict(), "state_dict": net.state_dict(), "thresholds": np.array([t0, t1, 0.0]),
                "measure": "max_softmax"}, out / "subnet.pt")
    np.savez_compressed(out / "val_logits.npz", logits=logits)  # reached_exits reads the logits alone
    return out


def test_drop_unreached_keeps_the_exits_val_reaches(tail_run_dir, images):
    full, cut = load_run(tail_run_dir), load_run(tail_run_dir, drop_unreached=True)
    assert (full.net.n_exits, cut.net.n_exits) == (3, 2) and cut.net.taps == [0]
    assert sum(p.numel() for p in cut.net.parameters()) < sum(p.numel() for p in full.net.parameters())
    assert cut.thresholds.tolist() == [full.thresholds[0], 0.0]
    eager = EarlyExitRuntime(cut.net, cut.thresholds, cut.measure)
    on_val = eager.classify(images)
    np.testing.assert_array_equal(on_val.exits, EarlyExitRuntime.from_run_dir(tail_run_dir).classify(images).exits)
    # unseen images that would go on to the dropped tail are answered by the last kept exit
    unseen = torch.randn(200, 1, 16, 16, generator=torch.Generator().manual_seed(7))
    before, after = EarlyExitRuntime(full.net, full.thresholds, full.measure).classify(unseen), eager.classify(unseen)
    went_on = before.exits == 2
    assert went_on.any() and (after.exits[went_on] == 1).all()
    np.testing.assert_array_equal(after.labels[~went_on], before.labels[~went_on])
    out = export_run(tail_run_dir, backends=["onnx"], drop_unreached=True)
    assert sorted(p.name for p in out.glob("*.onnx")) == ["head_0.onnx", "head_1.onnx", "segment_0.onnx",
                                                         "segment_1.onnx"]
    assert json.loads((out / "thresholds.json").read_text())["dropped_exits"] == 1
    exported = ExportedRuntime(out, "onnx").classify(unseen)
    np.testing.assert_array_equal(exported.exits, after.exits)
    np.testing.assert_array_equal(exported.labels, after.labels)


def test_drop_unreached_keeps_a_final_exit_val_reaches_and_needs_val_outputs(run_dir, tail_run_dir, net, images):
    (tail_run_dir / "val_logits.npz").unlink()
    with pytest.raises(FileNotFoundError, match="val_logits.npz is missing"):
        load_run(tail_run_dir, drop_unreached=True)
    shutil.copy(run_dir / "subnet.pt", tail_run_dir / "subnet.pt")  # median thresholds: the final exit answers some
    with torch.no_grad():
        logits = torch.stack(net(images), 1).numpy()
    np.savez_compressed(tail_run_dir / "val_logits.npz", logits=logits)
    assert load_run(tail_run_dir, drop_unreached=True).net.n_exits == 3
    np.savez_compressed(tail_run_dir / "val_logits.npz", logits=logits[:, :2])
    with pytest.raises(ValueError, match="not this subnet's"):
        load_run(tail_run_dir, drop_unreached=True)


def test_infer_cli_drop_unreached_reexports_the_shorter_network(tail_run_dir, tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(folder / f"img{i}.png")
    common = [f"run_dir={tail_run_dir}", f"input={folder}", "backend=torchscript", f"export_dir={tmp_path / 'exp'}"]
    assert infer_main(common) == 0 and all("/3" in line for line in capsys.readouterr().out.splitlines())
    assert infer_main(common + ["drop_unreached=true"]) == 0  # the folder's 3-exit export is replaced
    assert all("/2" in line for line in capsys.readouterr().out.splitlines())
    assert json.loads((tmp_path / "exp" / "thresholds.json").read_text())["n_exits"] == 2
    assert not (tmp_path / "exp" / "segment_2.pt").exists()
