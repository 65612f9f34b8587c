"""Stage 1's selection for torchdistill: the module paths it writes as `forward_hook` entries make
torchdistill's own ForwardHookManager capture the same tensors as the project's generalized layers."""
from __future__ import annotations

import torch
from torchdistill.core.forward_hook import ForwardHookManager

from common.layers.hooks import forward_with_features, generalized_layers
from common.models import create_model
from common.profile.forward_hooks import forward_hook_entry


def torchdistill_outputs(model: torch.nn.Module, paths: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """What a torchdistill run would read for these `forward_hook` output paths."""
    manager = ForwardHookManager(torch.device("cpu"))
    for path in paths:
        manager.add_hook(model, path, requires_input=False, requires_output=True)
    with torch.no_grad():
        model(x)
    return {path: entry["output"] for path, entry in manager.pop_io_dict().items()}


def test_torchdistill_hooks_capture_the_generalized_layers_of_tv_resnet18():
    torch.manual_seed(0)
    model = create_model("tv:resnet18", num_classes=10, image_size=32).eval()
    layers = generalized_layers(model)
    assert len(layers) > 4 and len({g.path for g in layers}) == len(layers)
    entry = forward_hook_entry([g.path for g in layers])
    assert entry == {"forward_hook": {"input": [], "output": [g.path for g in layers]}}
    x = torch.randn(2, 3, 32, 32)
    theirs = torchdistill_outputs(model, entry["forward_hook"]["output"], x)
    with torch.no_grad():
        _, ours = forward_with_features(model, x, [g.index for g in layers])
    for g in layers:
        assert torch.equal(theirs[g.path], ours[g.index]), g.path
    assert not torch.equal(theirs[layers[1].path].flatten()[:10], theirs[layers[2].path].flatten()[:10])  # distinct layers, not one tensor
