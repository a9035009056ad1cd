"""The associative-retrieval loss: 0.5 * |v* - v_hat|^2 per query, v* the one-hot answer,
averaged over queries. A model that outputs nothing (v_hat = 0) scores exactly 0.5."""
import torch
import torch.nn.functional as F
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.logging import metrics


@register_criterion("half_mse")
class HalfMSECriterion(FairseqCriterion):
    def forward(self, model, sample, reduce=True):
        v_hat = model(**sample["net_input"])  # (B, Q, S)
        target = sample["target"]              # (B, Q) value ids
        v_star = F.one_hot(target, v_hat.shape[-1]).to(v_hat.dtype)
        per_query = 0.5 * (v_star - v_hat).pow(2).sum(-1)
        loss = per_query.sum() if reduce else per_query
        sample_size = target.numel()
        with torch.no_grad():
            correct = (v_hat.argmax(-1) == target).sum()
        logging_output = {
            "loss": per_query.detach().sum().item(),
            "correct": correct.item(),
            "ntokens": sample["ntokens"],
            "nsentences": sample["nsentences"],
            "sample_size": sample_size,
        }
        return loss, sample_size, logging_output

    @staticmethod
    def reduce_metrics(logging_outputs):
        total = sum(log.get("sample_size", 0) for log in logging_outputs)
        loss = sum(log.get("loss", 0.0) for log in logging_outputs)
        correct = sum(log.get("correct", 0) for log in logging_outputs)
        # Plain mean over queries (no log(2) scaling: this is not a cross-entropy); 6 digits so
        # that losses near the 0.001 target stay readable.
        metrics.log_scalar("loss", loss / max(total, 1), total, round=6)
        metrics.log_scalar("accuracy", 100.0 * correct / max(total, 1), total, round=2)

    @staticmethod
    def logging_outputs_can_be_summed():
        return True
