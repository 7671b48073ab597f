"""The one driver of every method: check config -> data -> build -> ``seed.engine.fit`` -> export -> report.

``seed-pretrain`` and ``seed-distill`` both end here; a method says what differs in the class
methods of :class:`seed.module.TrainModule`. PreciseBN is applied here, once, to what every method
exports: the exported statistics are those of the final weights on train images under the eval
transform, not the running averages of augmented views.
"""

import dataclasses
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

from seed.checkpoints import export_model
from seed.config import method_name
from seed.engine import fit, run_folder
from seed.loaders import check_batch, make_loader
from seed.registry import method_of

#: The file each stage exports into the run folder.
EXPORTS = {"pretrain": "teacher.pt", "distill": "student.pt"}


def run(config: Any) -> Path:
    """Train the method ``config`` belongs to; returns the run folder."""
    method = method_of(config)
    config = method.configure(config)
    train_set = method.train_set(config)
    check_batch(len(train_set), config)
    monitor = method.monitor(config)
    config, parts = method.prepare(config, train_set)
    pl.seed_everything(config.seed, workers=True, verbose=False)
    run_dir = run_folder(config, method.STAGE, method.run_name(config, parts))
    module = method.build(config, parts, method.classes(train_set, parts), run_dir)
    loader = make_loader(train_set, config, shuffle=True, drop_last=True, repeats=method.repeats(config))
    trainer = fit(module, loader, monitor, config, run_dir)
    if trainer.is_global_zero:
        settled = module.final(monitor)
        head, embed_dim, extra = module.exported(settled)
        exported = EXPORTS[method.STAGE]
        export_model(run_dir / exported, method.trained_arch(config), settled[0], head, embed_dim, method_name(config),
                     dataclasses.asdict(config), bool(config.small_images), extra)
        module.report(settled, monitor, run_dir)
        print(f"\nrun folder: {run_dir} ({exported}, last.ckpt, config.yaml, logs/)")
    return run_dir

