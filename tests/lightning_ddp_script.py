"""Run by tests/test_lightning.py as ``python lightning_ddp_script.py OUT_DIR``: 2 CPU processes under Lightning's
``strategy="ddp"`` (gloo), AMP through the plugin; each rank saves its parameters and logged θ-losses to
OUT_DIR/rank{r}.pt. Lightning starts rank 1 by running this script again, so it is a script, not a test."""
import no_triton_shadow  # noqa: F401 - first: this folder is sys.path[0] here, and holds a triton/ folder

import sys

import torch
from torch import nn

STEPS, LOCAL_BATCH, WORLD = 3, 8, 2
HP = dict(lr=0.5, epsilon=0.05, inner_lr=1.0, momentum=0.9, inner_iter=2)


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)).double()


def dataset():
    gen = torch.Generator().manual_seed(1)
    n = STEPS * LOCAL_BATCH * WORLD
    x = torch.randn(n, 8, generator=gen, dtype=torch.float64)
    x[::2] += 1.0  # the ranks' samples differ in distribution (DistributedSampler interleaves indices)
    return torch.utils.data.TensorDataset(x, torch.randint(0, 4, (n,), generator=gen))


def single_process():
    """AMP on the global batch: the DistributedSampler (shuffle=False) deals rank r the indices r, r + 2, …, so
    the global batch of step s is samples [2·s·B, 2·(s+1)·B)."""
    from amp_fused import AMP
    net = mlp()
    opt = AMP(net.parameters(), **HP)
    data, losses = dataset(), []
    for s in range(STEPS):
        x, y = data[2 * s * LOCAL_BATCH:2 * (s + 1) * LOCAL_BATCH]

        def closure():
            loss = nn.functional.cross_entropy(net(x), y)
            loss.backward()
            return loss

        losses.append(opt.step(closure))
    return torch.cat([p.detach().flatten() for p in net.parameters()]), torch.stack(losses)


def main(out):
    import lightning.pytorch as pl

    from amp_fused import AMP
    from amp_fused.integrations.lightning import AMPPrecision

    torch.set_num_threads(1)

    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net, self.losses = mlp(), []

        def training_step(self, batch, batch_idx):
            loss = nn.functional.cross_entropy(self.net(batch[0]), batch[1])
            if not self.optimizers().is_perturbed:
                # the global-batch loss at θ: the mean of the ranks' means (equal local batch sizes)
                self.losses.append(self.all_gather(loss.detach()).mean())
            return loss

        def configure_optimizers(self):
            return AMP(self.parameters(), **HP)

        def train_dataloader(self):  # an explicit unshuffled sampler: the split is what single_process assumes
            sampler = torch.utils.data.DistributedSampler(dataset(), self.trainer.world_size, self.global_rank,
                                                          shuffle=False)
            return torch.utils.data.DataLoader(dataset(), batch_size=LOCAL_BATCH, sampler=sampler)

    module = Net()
    trainer = pl.Trainer(strategy="ddp", devices=WORLD, accelerator="cpu", max_epochs=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         plugins=[AMPPrecision()], use_distributed_sampler=False)
    trainer.fit(module)
    torch.save({"params": torch.cat([p.detach().flatten() for p in module.parameters()]),
                "losses": torch.stack(module.losses), "global_step": trainer.global_step},
               f"{out}/rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1])
