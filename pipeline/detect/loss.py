"""SSD loss: classification (hard negative mining, focal, or the course's plain CE) plus a box loss
on positive anchors, both normalised by the number of positive anchors."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss


class MultiBoxLoss(torch.nn.Module):
    """Args:
        mode: ``hard_negative`` (softmax CE on positives and the ``neg_pos_ratio`` x as many
            hardest negatives per image), ``focal`` (sigmoid focal loss over all anchors, scores
            are sigmoids), or ``plain`` (the course: mean CE over every anchor).
        box_loss: ``smooth_l1`` or ``l1`` on the encoded offsets of positive anchors.
    """

    def __init__(self, mode: str = "hard_negative", neg_pos_ratio: float = 3.0, focal_alpha: float = 0.25,
                 focal_gamma: float = 2.0, box_loss: str = "smooth_l1", box_weight: float = 1.0) -> None:
        super().__init__()
        self.mode, self.neg_pos_ratio = mode, neg_pos_ratio
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.box_loss, self.box_weight = box_loss, box_weight

    def forward(self, cls_logits: torch.Tensor, box_offsets: torch.Tensor, cls_t: torch.Tensor,
                box_t: torch.Tensor) -> dict[str, torch.Tensor]:
        """Tensors only, on the device: positives and hard negatives are masks, not indexed
        selections, so nothing waits for the device to say how many there are."""
        cls_logits, box_offsets = cls_logits.float(), box_offsets.float()
        pos = cls_t > 0
        num_pos = pos.sum().clamp(min=1).float()
        zero = cls_logits.new_zeros(())
        if self.mode == "focal":
            onehot = F.one_hot(cls_t, cls_logits.shape[-1])[..., 1:].to(cls_logits.dtype)
            cls = sigmoid_focal_loss(cls_logits[..., 1:], onehot, self.focal_alpha, self.focal_gamma, "sum") / num_pos
        else:
            ce = F.cross_entropy(cls_logits.reshape(-1, cls_logits.shape[-1]), cls_t.reshape(-1),
                                 reduction="none").reshape(cls_t.shape)
            if self.mode == "plain":
                cls = ce.mean()
            else:
                cls = torch.where(pos | self._hard_negatives(ce, pos), ce, zero).sum() / num_pos
        if self.box_loss == "smooth_l1":
            box = F.smooth_l1_loss(box_offsets, box_t, reduction="none", beta=1.0)
        else:
            box = (box_offsets - box_t).abs()
        box = torch.where(pos.unsqueeze(-1), box, zero).sum() / num_pos
        return {"loss": cls + self.box_weight * box, "cls_loss": cls.detach(), "box_loss": box.detach()}

    def _hard_negatives(self, ce: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Mask of each image's ``neg_pos_ratio`` x positives background anchors of highest loss
        (at least one): one sort, its first places marked and scattered back."""
        neg_loss = ce.detach().masked_fill(pos, float("-inf"))
        n_neg = (pos.sum(dim=1, keepdim=True) * self.neg_pos_ratio).long().clamp(min=1)
        order = neg_loss.argsort(dim=1, descending=True)
        places = torch.arange(ce.shape[1], device=ce.device).unsqueeze(0) < n_neg
        return torch.zeros_like(pos).scatter_(1, order, places) & ~pos
