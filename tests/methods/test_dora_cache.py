"""DoRA's eval-mode caches (‖W0‖² and the gain m/‖W0+sBA‖) follow the tensors they come from: a load_state_dict or
an in-place edit, of the adapter or of the base, is seen without anyone calling clear_cache()."""
import torch

import lorakit

from conftest import MLP


def _fresh_out(model, x):
    for _, a in lorakit.adapters(model):
        a.clear_cache()
    with torch.no_grad():
        return model(x)


def test_eval_cache_notices_load_state_dict_and_in_place_edits():
    torch.manual_seed(0)
    model = MLP()
    lorakit.attach(model, {"method": "dora", "targets": ["lin0", "lin1"], "r": 2})
    x = torch.randn(5, 12)
    model.eval()
    with torch.no_grad():
        model(x)  # fills the caches
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    for k in sd:
        if "lora_" in k:
            sd[k] = sd[k] + 0.1 * torch.randn_like(sd[k])
    model.load_state_dict(sd)
    with torch.no_grad():
        got = model(x)
    assert torch.allclose(got, _fresh_out(model, x), atol=1e-6)
    with torch.no_grad():
        model(x)  # cache again, then edit the adapter and the base in place
        model.lin0.adapters["default"].lora_magnitude_vector.mul_(1.5)
        got = model(x)
    assert torch.allclose(got, _fresh_out(model, x), atol=1e-6)
    with torch.no_grad():
        model(x)
        model.lin1.base_layer.weight.mul_(0.5)
        got = model(x)
    assert torch.allclose(got, _fresh_out(model, x), atol=1e-6)
