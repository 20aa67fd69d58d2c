"""Cost per token and per request from the recipe's price and the measured throughput (pure)."""

from __future__ import annotations

from ..recipe import CostSpec


def cost_metrics(price: CostSpec, *, requests_per_s: float, output_tokens_per_s: float,
                 mean_tokens_in: float, mean_tokens_out: float) -> dict:
    """USD per 1M output tokens and per request, with the tokens-in/tokens-out breakdown.

    Machine pricing (usd_per_hour) charges wall time: what a second of a saturated replica costs
    divided by what it produced. Per-token pricing (a hosted API) charges the tokens themselves.
    """
    out = {"tokens_in_per_request": mean_tokens_in, "tokens_out_per_request": mean_tokens_out}
    if price.usd_per_hour is not None:
        per_s = price.usd_per_hour / 3600
        out["usd_per_1m_output_tokens"] = per_s / output_tokens_per_s * 1e6 if output_tokens_per_s > 0 else float("inf")
        out["usd_per_request"] = per_s / requests_per_s if requests_per_s > 0 else float("inf")
        out["pricing"] = f"{price.usd_per_hour} USD/hour of the serving machine"
    else:
        pin = price.usd_per_1m_input_tokens or 0.0
        pout = price.usd_per_1m_output_tokens or 0.0
        per_req = (mean_tokens_in * pin + mean_tokens_out * pout) / 1e6
        out["usd_per_request"] = per_req
        out["usd_per_1m_output_tokens"] = per_req / mean_tokens_out * 1e6 if mean_tokens_out else float("inf")
        out["pricing"] = f"{pin} / {pout} USD per 1M input / output tokens"
    return out
