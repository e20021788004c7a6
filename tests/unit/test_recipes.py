"""Fine-tuning recipes (seed 000 §4.2 baseline, §4.3 pretrained) and ImageNet initialisation."""

import json
import signal

import pandas as pd
import pytest
import torch
from test_finetune import make_crop_source

from cellstage.train.recipes import Baseline, Pretrained, as_recipe, is_vit_small_or_base
from cellstage.utils import CellstageError

# the §4.3 shape in 4 epochs: frozen, 5e-5, 1e-4 (held through paper epoch 3), 5e-5
SHORT_PRETRAINED = {"name": "pretrained", "epochs": 4, "backbone_lr_start": 5e-5, "hold_until_epoch": 3}
RUN = dict(n_folds=2, backbone="resnet18", batch_size=32, progress=False, accelerator="cpu", num_threads=1)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("crops")
    train = [make_crop_source(d, "s1_20x", n_per_class=6, seed=1)]
    test = [make_crop_source(d, "s2_20x", n_per_class=2, seed=2, split="test", patient="p2")]
    yield train, test
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ssl_weights(tmp_path_factory):
    from cellstage.training.backbones import create_backbone, save_weights

    path = tmp_path_factory.mktemp("w") / "backbone.safetensors"
    torch.manual_seed(5)
    save_weights(create_backbone("resnet18", img_size=40), path)
    return path


# ------------------------------------------------------------------------- schedules
def test_pretrained_recipe_is_the_papers_schedule():
    r = Pretrained()
    expected = [0.0] + [1e-6 * 2**k for k in range(7)] + [1e-4] * 14 + [1e-4 * 0.5**k for k in range(1, 9)]
    assert len(expected) == r.epochs == 30
    assert [r.lr_at("backbone", e, "resnet18") for e in range(30)] == pytest.approx(expected, rel=1e-12)
    assert [r.lr_at("head", e, "resnet18") for e in range(30)] == [1e-4] * 30
    assert [r.frozen(e) for e in range(3)] == [True, False, False]
    assert r.backbone_lr(21) == 1e-4 and r.backbone_lr(22) == 5e-5  # the paper's epochs 22 and 23


def test_baseline_recipe_lr_and_vit_small_base_exception():
    b = Baseline()
    assert (b.epochs, b.plateau_factor, b.plateau_patience) == (100, 0.5, 10)
    assert b.initial_lr("resnet50") == b.initial_lr("vit_tiny_patch16_224") == 1e-3
    assert b.initial_lr("vit_small_patch16_224") == b.initial_lr("vit_base_patch16_224") == 1e-4
    assert is_vit_small_or_base("deit3_small_patch16_224") and not is_vit_small_or_base("resnet18")
    assert not any(b.frozen(e) for e in range(100)) and b.lr_at("backbone", 3, "resnet18") is None


def test_vit_small_gets_1e_4_through_the_recipe(monkeypatch):
    import cellstage.train.classifier as classifier
    from cellstage.training.backbones import create_backbone

    # the rate depends on the name only; a small stand-in network keeps the test fast
    monkeypatch.setattr(classifier, "create_backbone", lambda name, img_size: create_backbone("resnet18"))
    opt = classifier.CellClassifier("vit_small_patch16_224", img_size=40).configure_optimizers()
    assert [(g["name"], g["lr"]) for g in opt.param_groups] == [("backbone", 1e-4), ("head", 1e-4)]


def test_recipe_from_name_or_mapping_and_errors():
    assert as_recipe("pretrained") == Pretrained()
    assert as_recipe(Pretrained(epochs=3).to_dict()) == Pretrained(epochs=3)
    with pytest.raises(CellstageError, match="unknown settings"):
        as_recipe({"name": "baseline", "warmup": 3})
    with pytest.raises(CellstageError, match="expected one of"):
        as_recipe("cosine")


def test_schema_defaults_are_the_recipes_defaults():
    from pathlib import Path

    import yaml

    schema = yaml.safe_load((Path(__file__).parents[2] / "workflow/schemas/config.schema.yaml").read_text())
    recipes = schema["properties"]["finetune"]["properties"]["recipes"]["properties"]
    for name, cls in (("baseline", Baseline), ("pretrained", Pretrained)):
        defaults = {k: v["default"] for k, v in recipes[name]["properties"].items()}
        assert as_recipe({"name": name, **defaults}) == cls(), name


# --------------------------------------------------------------- history and freezing
def test_history_lr_per_epoch_follows_the_pretrained_schedule_and_epoch_0_is_frozen(
    sources, ssl_weights, tmp_path, monkeypatch
):
    from killed_run import capture_final_states

    from cellstage.train import run_fold
    from cellstage.training.backbones import create_backbone, load_weights

    m = run_fold(*sources, tmp_path / "p", fold=0, pretrained_path=ssl_weights, recipe=SHORT_PRETRAINED, **RUN)
    h = pd.read_csv(tmp_path / "p" / "history.csv")
    recipe = as_recipe(SHORT_PRETRAINED)
    assert list(h["epoch"]) == [0, 1, 2, 3] and m["config"]["recipe"] == recipe.to_dict()
    assert list(h["backbone_lr"]) == [recipe.backbone_lr(e) for e in range(4)] == [0.0, 5e-5, 1e-4, 5e-5]
    assert list(h["head_lr"]) == [1e-4] * 4

    # one frozen epoch only: the backbone (weights and BatchNorm statistics) is still the loaded one
    final = capture_final_states(monkeypatch)
    run_fold(*sources, tmp_path / "f", fold=0, pretrained_path=ssl_weights,
             recipe={**SHORT_PRETRAINED, "epochs": 1}, **RUN)
    loaded = load_weights(create_backbone("resnet18", img_size=40), ssl_weights).state_dict()
    after = final[0]
    for k, v in loaded.items():
        assert torch.equal(after[f"backbone.{k}"], v), k
    fresh_head = {k: v for k, v in after.items() if k.startswith("head.")}
    assert fresh_head and json.loads((tmp_path / "f" / "metrics.json").read_text())["epochs"] == 1


def test_a_frozen_epoch_leaves_the_backbone_without_optimiser_state(sources):
    """Frozen = not updated at all: no AdamW moments or weight decay, BatchNorm statistics kept."""
    import lightning as L

    from cellstage.train.classifier import CellClassifier
    from cellstage.training.data import CropDataModule

    m = CellClassifier("resnet18", img_size=40, recipe={"name": "pretrained", "epochs": 1})
    before = {k: v.clone() for k, v in m.backbone.state_dict().items()}
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")
    trainer.fit(m, CropDataModule(sources[0], [], fold=0, n_folds=2, batch_size=32))
    state = trainer.optimizers[0].state
    assert not any(state[p] for p in m.backbone.parameters())
    assert all(state[p] for p in m.head.parameters())
    assert all(torch.equal(before[k], v) for k, v in m.backbone.state_dict().items())


def test_baseline_history_has_one_rate_for_backbone_and_head(sources, tmp_path):
    from cellstage.train import run_fold

    run_fold(*sources, tmp_path / "b", fold=0, recipe={"name": "baseline", "epochs": 1}, **RUN)
    h = pd.read_csv(tmp_path / "b" / "history.csv")
    assert list(h.columns) == ["epoch", "train_loss", "train_acc", "val_loss", "val_top1", "lr", "backbone_lr",
                               "head_lr"]
    assert list(h["backbone_lr"]) == list(h["head_lr"]) == list(h["lr"]) == [1e-3]


def test_pretrained_recipe_killed_after_the_frozen_epoch_resumes_identically(sources, ssl_weights, tmp_path,
                                                                               monkeypatch):
    """SIGKILL in epoch 1 (the checkpoint of the frozen epoch 0 on disk): the unfreezing and the rates
    of the resumed run are those of an uninterrupted one."""
    from killed_run import assert_same_tensors, capture_final_states, kill_mid_epoch

    from cellstage.train import run_fold

    train, test = sources
    kw = {"fold": 0, "pretrained_path": ssl_weights, "recipe": SHORT_PRETRAINED, **RUN}
    killed = tmp_path / "killed" / "fold0"
    k = kill_mid_epoch("cellstage.train.cv:run_fold", [train, test, killed], kw, pause_epoch=1,
                       workdir=tmp_path / "child", threads=torch.get_num_threads())
    assert k["returncode"] == -signal.SIGKILL and k["paused"]["epochs_done_on_disk"] == 1
    final = capture_final_states(monkeypatch)
    resumed = run_fold(train, test, killed, **kw)
    straight = run_fold(train, test, tmp_path / "straight" / "fold0", **kw)
    assert resumed["resumed"] and resumed["resumed_from_epoch"] == 1
    assert_same_tensors(final[0], final[1])
    pd.testing.assert_frame_equal(pd.read_csv(killed / "history.csv"),
                                  pd.read_csv(tmp_path / "straight" / "fold0" / "history.csv"), check_exact=True)
    assert resumed["val"] == straight["val"] and resumed["test"] == straight["test"]


# -------------------------------------------------------------------------- ImageNet
def _timm_weights(tmp_path, name="resnet18", suffix=".safetensors"):
    """A whole timm model's state dict (with its 1000-class classifier), randomly initialised."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(3)
    state = timm.create_model(name, pretrained=False).state_dict()
    path = tmp_path / f"{name}{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return path, state


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_imagenet_init_loads_a_local_timm_file_without_its_classifier(tmp_path, suffix):
    from cellstage.train.classifier import CellClassifier

    path, state = _timm_weights(tmp_path, suffix=suffix)
    m = CellClassifier("resnet18", img_size=40, pretrained_path=str(path),
                       pretrained_key="config finetune.imagenet_weights.resnet18")
    own = m.backbone.state_dict()
    assert "fc.weight" in state and "fc.weight" not in own
    for k, v in own.items():
        assert torch.equal(v, state[k]), k


def test_imagenet_weights_errors_name_the_config_key_and_file(tmp_path):
    from cellstage.train.classifier import CellClassifier

    key = "config finetune.imagenet_weights.resnet18"
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(CellstageError, match=f"{key}: {missing} does not exist"):
        CellClassifier("resnet18", img_size=40, pretrained_path=str(missing), pretrained_key=key)
    vit, _ = _timm_weights(tmp_path, "vit_tiny_patch16_224")
    with pytest.raises(CellstageError, match=f"{key}: {vit} does not fit backbone 'resnet18'"):
        CellClassifier("resnet18", img_size=40, pretrained_path=str(vit), pretrained_key=key)
    # a ViT's ImageNet weights do not fit the 40 px / patch 4 ViT (seed 000 §4.2)
    with pytest.raises(CellstageError, match="shapes differ"):
        CellClassifier("vit_tiny_patch16_224", img_size=40, pretrained_path=str(vit), pretrained_key=key)
    pickle = tmp_path / "pickle.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "obj": Baseline()}, pickle)  # more than tensors
    with pytest.raises(CellstageError, match="not a readable tensors-only torch file"):
        CellClassifier("resnet18", img_size=40, pretrained_path=str(pickle), pretrained_key=key)
