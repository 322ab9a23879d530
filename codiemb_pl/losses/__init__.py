"""Training losses: IR multi-positive InfoNCE (SPEC §3), STS order-aware losses (SPEC §4), gathering."""

from codiemb_pl.losses.gather import gather_no_grad, gather_with_grad, rank_and_world
from codiemb_pl.losses.ir import ir_batch_diagnostics, multi_positive_info_nce
from codiemb_pl.losses.sts import (
    STSLossConfig,
    cosent_loss,
    descending_average_ranks,
    mid_nce_loss,
    pearson_loss,
    pro_loss,
    rank_kl_loss,
    sts_loss,
)

__all__ = [
    "STSLossConfig", "cosent_loss", "descending_average_ranks",
    "gather_no_grad", "gather_with_grad", "ir_batch_diagnostics", "mid_nce_loss",
    "multi_positive_info_nce", "pearson_loss", "pro_loss", "rank_and_world", "rank_kl_loss", "sts_loss",
]
