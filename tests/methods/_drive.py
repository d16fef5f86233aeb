"""Drive Controllers exactly as the trainer does: on_train_begin, then per step backward -> before_step ->
optimizer.step -> step."""
import torch

import lorakit


def train(model, x, steps, lr=1e-2, fake_grads=False, seed=0, hook=None):
    ctrls = lorakit.training_controllers(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    for c in ctrls:
        c.on_train_begin(model, opt, steps)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        opt.zero_grad()
        if fake_grads:
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)
        else:
            out = model(x)
            loss = out.float().pow(2).mean()
            extra = lorakit.extra_loss(model)
            (loss if extra is None else loss + extra).backward()
        for c in ctrls:
            c.before_step(step, model, opt)
        opt.step()
        for c in ctrls:
            c.step(step, model, opt)
        if hook:
            hook(step, ctrls)
    return ctrls
