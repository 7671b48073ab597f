"""``seed-eval detection``: transfer a student backbone to VOC / COCO object detection.

The protocol is MoCo's (He et al. 2020, Sec. 4.2; SEED reports the same):
Faster R-CNN R50-C4 on VOC07+12 trainval, 24k iterations, batch 16, lr 0.02
(x0.1 at 18k and 22k), tested on VOC07 test; Mask R-CNN C4 1x on COCO
(90k iterations, x0.1 at 60k and 80k). BatchNorm is trained (SyncBN across
GPUs) and res5, in the RoI head, ends with one more norm layer (MoCo's
``Res5ROIHeadsExtraNorm``).

Two engines run it:

* ``detectron2`` (when it imports): the backbone is converted to detectron2's
  names (:func:`to_detectron2`, as MoCo's ``convert-pretrain-to-detectron2.py``)
  and detectron2's ``DefaultTrainer`` trains with MoCo's config values
  (:func:`detectron2_overrides`).
* ``torchvision`` (always): ``torchvision.models.detection`` Faster R-CNN /
  Mask R-CNN around the same backbone, C4-style (res2-res4 as backbone, res5
  in the RoI head) or with an FPN, trained with the same schedule as a
  LightningModule by the project's one engine (``seed.engine.fit``).

Both are scored the same way: pycocotools' COCOeval (AP, AP50, AP75; mask AP
with masks) and, on VOC, the VOC2007 devkit's 11-point AP at IoU 0.5, 0.75 and
averaged over 0.5:0.95 (the numbers MoCo's tables give for VOC).

The package: ``config`` (flags, recipes), ``data`` (VOC XML / COCO JSON readers, the
synthetic sets), ``models`` (torchvision detectors), ``train`` (the torchvision engine's
LightningModule), ``d2`` (the detectron2 engine), ``metrics`` (VOC and COCO scores), ``run`` (the command).
"""

from downstream.detection.run import main

__all__ = ["main"]
