"""The model registry: names, layer structure, parameter counts, `mnistlab models`."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from mnistlab.cli import main
from mnistlab.errors import MnistlabError
from mnistlab.models import MODELS, count_parameters, create_model, register

NAMES = ["logreg", "mlp", "mlp-dropout", "mlp-bn", "cnn"]


def linear(n_in: int, n_out: int) -> int:
    return n_in * n_out + n_out


# Counted by hand from SPEC part 2 and the PyTorch MNIST example.
IMPROVED = linear(784, 256) + linear(256, 128) + linear(128, 64) + linear(64, 10)
EXPECTED_PARAMETERS = {
    "logreg": linear(784, 10),  # 7,850
    "mlp": linear(784, 128) + linear(128, 10),  # 101,770
    "mlp-dropout": IMPROVED,
    "mlp-bn": IMPROVED + 2 * (256 + 128 + 64),  # BatchNorm1d: a weight and a bias per feature
    "cnn": (32 * 9 + 32) + (64 * 32 * 9 + 64) + linear(9216, 128) + linear(128, 10),
}


def invoke(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def layers(model: nn.Module) -> list[str]:
    """The leaf modules in order, e.g. ['Flatten', 'Linear(784,128)', 'ReLU', ...]."""
    out = []
    for m in model.modules():
        if list(m.children()):
            continue
        if isinstance(m, nn.Linear):
            out.append(f"Linear({m.in_features},{m.out_features})")
        elif isinstance(m, nn.Conv2d):
            out.append(f"Conv2d({m.in_channels},{m.out_channels},{m.kernel_size[0]})")
        elif isinstance(m, nn.BatchNorm1d):
            out.append(f"BatchNorm1d({m.num_features})")
        elif isinstance(m, nn.Dropout):
            out.append(f"Dropout({m.p})")
        else:
            out.append(type(m).__name__)
    return out


def test_registry_has_the_required_models_first():
    assert list(MODELS)[: len(NAMES)] == NAMES  # later issues may register more after them


@pytest.mark.parametrize("name", NAMES)
def test_every_model_maps_a_batch_to_ten_logits(name):
    torch.manual_seed(0)
    model = create_model(name)
    x = torch.randn(5, 1, 28, 28)
    model.eval()
    logits = model(x)
    assert logits.shape == (5, 10)
    assert logits.dtype == torch.float32
    probs = logits.softmax(1)
    assert torch.allclose(probs.sum(1), torch.ones(5))
    # Train mode too (dropout and batch norm behave differently there).
    model.train()
    assert model(x).shape == (5, 10)


@pytest.mark.parametrize("name", NAMES)
def test_parameter_counts(name):
    assert count_parameters(create_model(name)) == EXPECTED_PARAMETERS[name]


def test_lab_parameter_counts_by_number():
    assert count_parameters(create_model("logreg")) == 7850
    assert count_parameters(create_model("mlp")) == 101770


def test_layer_structure_follows_the_lab():
    assert layers(create_model("logreg")) == ["Flatten", "Linear(784,10)"]
    assert layers(create_model("mlp")) == ["Flatten", "Linear(784,128)", "ReLU", "Linear(128,10)"]
    assert layers(create_model("mlp-dropout")) == [
        "Flatten",
        "Linear(784,256)", "ReLU", "Dropout(0.3)",
        "Linear(256,128)", "ReLU", "Dropout(0.3)",
        "Linear(128,64)", "ReLU",
        "Linear(64,10)",
    ]  # fmt: skip
    assert layers(create_model("mlp-bn")) == [
        "Flatten",
        "Linear(784,256)", "BatchNorm1d(256)", "ReLU", "Dropout(0.3)",
        "Linear(256,128)", "BatchNorm1d(128)", "ReLU", "Dropout(0.3)",
        "Linear(128,64)", "BatchNorm1d(64)", "ReLU",
        "Linear(64,10)",
    ]  # fmt: skip
    cnn = layers(create_model("cnn"))
    assert [x for x in cnn if x.startswith(("Conv2d", "Linear", "Dropout"))] == [
        "Conv2d(1,32,3)", "Conv2d(32,64,3)", "Dropout(0.25)", "Dropout(0.5)",
        "Linear(9216,128)", "Linear(128,10)",
    ]  # fmt: skip


def test_mlp_forward_is_the_lab_data_path():
    torch.manual_seed(1)
    model = create_model("mlp").eval()
    x = torch.randn(3, 1, 28, 28)
    fc1, fc2 = model.fc1, model.fc2
    expected = fc2(torch.relu(fc1(x.flatten(1))))
    assert torch.equal(model(x), expected)


def test_mlp_width_depth_and_dropout_extend_the_lab_model():
    wide = create_model("mlp", hidden=256)
    assert count_parameters(wide) == linear(784, 256) + linear(256, 10)
    deep = create_model("mlp", hidden=64, depth=3, dropout=0.2)
    assert layers(deep) == ["Flatten", "Linear(784,64)", "ReLU", "Dropout(0.2)",
                            "Linear(64,64)", "Linear(64,64)", "Linear(64,10)"]
    assert count_parameters(deep) == linear(784, 64) + 2 * linear(64, 64) + linear(64, 10)
    assert list(create_model("mlp").state_dict()) == ["fc1.weight", "fc1.bias", "fc2.weight",
                                                      "fc2.bias"]  # the lab's names, kept
    torch.manual_seed(0)
    x = torch.randn(4, 1, 28, 28)
    deep.eval()
    h = x.flatten(1)
    for fc in (deep.fc1, deep.fc2, deep.fc3):
        h = torch.relu(fc(h))
    assert torch.equal(deep(x), deep.fc4(h))  # dropout is off in eval mode
    for bad in ({"hidden": 0}, {"depth": 0}, {"dropout": 1.0}, {"hidden": 2.5}):
        with pytest.raises(MnistlabError, match="bad arguments for model 'mlp'"):
            create_model("mlp", **bad)


def test_model_arguments_pass_through_and_bad_ones_are_clear():
    model = create_model("mlp-dropout", dropout=0.5)
    assert {m.p for m in model.modules() if isinstance(m, nn.Dropout)} == {0.5}
    with pytest.raises(MnistlabError, match="bad arguments for model 'mlp'"):
        create_model("mlp", width=3)


def test_unknown_model_lists_the_valid_names():
    with pytest.raises(MnistlabError) as e:
        create_model("resnet")
    assert "unknown model 'resnet'" in str(e.value)
    for name in NAMES:
        assert name in str(e.value)


def test_adding_a_model_is_one_registered_class(capsys):
    @register("tiny-test", "A test model: one Linear(784, 10) without bias.")
    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(784, 10, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x.flatten(1))

    try:
        assert isinstance(create_model("tiny-test"), Tiny)
        code, out, _ = invoke(capsys, "models", "--json")
        assert code == 0
        rows = {r["name"]: r for r in json.loads(out)["models"]}
        assert rows["tiny-test"]["parameters"] == 7840
        assert rows["tiny-test"]["class"] == "Tiny"
    finally:
        MODELS.pop("tiny-test")


def test_models_command_lists_name_class_parameters_description(capsys):
    code, out, err = invoke(capsys, "models")
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].split() == ["name", "class", "parameters", "description"]
    by_name = {line.split()[0]: line.split() for line in lines[1 : 1 + len(MODELS)]}
    assert by_name["mlp"][1:3] == ["SimpleMNISTDNN", "101,770"]
    assert by_name["logreg"][1:3] == ["LogisticRegression", "7,850"]
    assert by_name["cnn"][2] == f"{EXPECTED_PARAMETERS['cnn']:,}"
    assert "recipes" in out and "lab" in out


def test_models_json(capsys):
    code, out, _ = invoke(capsys, "models", "--json")
    assert code == 0
    data = json.loads(out)
    rows = {r["name"]: r for r in data["models"]}
    assert list(rows) == list(MODELS)
    for name in NAMES:
        assert rows[name]["parameters"] == EXPECTED_PARAMETERS[name]
        assert rows[name]["class"] == type(create_model(name)).__name__
        assert rows[name]["description"]
    recipes = {r["name"]: r for r in data["recipes"]}
    assert {"lab", "logreg", "advanced", "cnn"} <= set(recipes)
    assert recipes["advanced"]["model"] == "mlp-bn"
    assert recipes["cnn"]["model"] == "cnn" and recipes["cnn"]["epochs"] == 3
