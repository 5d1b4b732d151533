"""create_classifier: any timm name, pretrained false / file / hub, clear errors."""
from __future__ import annotations

import pytest
import torch

from pipeline.config import ModelConfig
from pipeline.errors import PipelineError
from pipeline.models import create_classifier, head_parameters


def test_creates_timm_model_with_new_head():
    model = create_classifier(ModelConfig(backbone="resnet10t", drop_rate=0.2), num_classes=7)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 7)
    head = head_parameters(model)
    assert head and all(p is q for p, q in zip(head, model.get_classifier().parameters()))


def test_drop_path_rate_reaches_the_model():
    model = create_classifier(ModelConfig(backbone="test_efficientnet", drop_path_rate=0.1), num_classes=3)
    rates = [m.drop_prob for m in model.modules() if type(m).__name__ == "DropPath"]
    assert rates and max(rates) > 0


def test_bad_backbone_lists_close_timm_names():
    with pytest.raises(PipelineError) as err:
        create_classifier(ModelConfig(backbone="resnet181"), num_classes=3)
    msg = str(err.value)
    assert "'resnet181' is not a timm model" in msg and "resnet18" in msg and "resnet101" in msg


def test_pretrained_from_local_file_loads_body_and_replaces_head(tmp_path):
    source = create_classifier(ModelConfig(backbone="resnet10t"), num_classes=10)
    path = tmp_path / "weights.pt"
    torch.save({"model": source.state_dict()}, path)
    model = create_classifier(ModelConfig(backbone="resnet10t", pretrained=str(path)), num_classes=4)
    assert torch.equal(model.conv1[0].weight, source.conv1[0].weight)
    assert model.get_classifier().out_features == 4


def test_pretrained_file_errors_are_clear(tmp_path):
    with pytest.raises(PipelineError, match="no such weights file"):
        create_classifier(ModelConfig(backbone="resnet10t", pretrained=str(tmp_path / "nope.pt")), 3)
    wrong = tmp_path / "wrong.pt"
    torch.save({"model": {"x": torch.zeros(1)}}, wrong)
    with pytest.raises(PipelineError, match="has no weights for .* tensors of resnet10t"):
        create_classifier(ModelConfig(backbone="resnet10t", pretrained=str(wrong)), 3)


def test_pretrained_true_without_network_is_clear(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no retries against an unreachable hub
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    # empty caches: on a machine whose caches hold the weights they would load without network
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(PipelineError, match="could not load weights .* hub"):
        create_classifier(ModelConfig(backbone="resnet10t", pretrained=True), 3)
