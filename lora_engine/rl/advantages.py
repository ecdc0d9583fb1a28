"""Advantages: group-normalised (GRPO / Dr.GRPO), per adapter and per prompt group, and per token
from step rewards (return-to-go) or dense per-token rewards.

Notation: N samples (completions) in the batch, B rows and L tokens for per-token tensors.
Sequence-level functions take lists or tensors on any device and return CPU tensors ([N] is
tiny); per-token functions compute on the device of their ``[B, L]`` input, in float64.
A *group* is every sample of one adapter answering one prompt: the baseline of a sample is the
mean reward of its own group only, so adding another adapter's samples to the batch never
changes an adapter's advantages (:func:`make_group_ids` builds such ids).

Sequence rewards (one scalar per completion), :func:`group_advantages`, match TRL's GRPOTrainer
(trl 1.16, ``_generate_and_score_completions``, ``multi_objective_aggregation=
"sum_then_normalize"``) exactly::

    A_i = r_i - mean_g(r)                          scale="none"  (Dr.GRPO, TRL scale_rewards="none")
    A_i = (r_i - mean_g(r)) / (std_g(r) + eps)     scale="std"   (GRPO, TRL scale_rewards="group")

with ``std_g`` the *unbiased* (Bessel-corrected, n-1) standard deviation, ``eps = 1e-4``, and a
skipped sample (reward None/NaN) excluded from its group's mean and std and given advantage 0.

Per-token rewards (study C, reward density vs rank): the reward arrives as *deposits* ``[B, L]`` on some tokens.
:func:`deposit_advantages` branches on the measured deposit density of each group, never on the
name of the reward: sparse deposits (an outcome reward on the last token, a process reward per
step) are normalised over the group's deposits and summed into a return-to-go (DeepSeekMath
4.1.3, :func:`token_returns`); dense deposits (a per-token distillation reward) are normalised
per token over the group (:func:`token_advantages`).
"""
from __future__ import annotations


import torch

SCALES = ("std", "none")


def _check_scale(scale: str) -> None:
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}: use 'std' (GRPO) or 'none' (Dr.GRPO)")


def _as_rewards(rewards) -> torch.Tensor:
    """list[float | None] or tensor -> float64 [N] with NaN for skipped samples."""
    if isinstance(rewards, torch.Tensor):
        r = rewards.detach().to("cpu", torch.float64)
    else:
        r = torch.tensor([float("nan") if x is None else float(x) for x in rewards],
                         dtype=torch.float64)
    if r.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(r.shape)}; flatten per sample")
    if torch.isinf(r).any():
        raise ValueError("rewards contain inf; return None (skip) from the reward function instead")
    return r


def _as_ids(ids, n: int, name: str) -> torch.Tensor:
    if isinstance(ids, torch.Tensor):
        t = ids.detach().cpu()
    else:
        ids = list(ids)
        t = torch.as_tensor(ids) if ids else torch.zeros(0, dtype=torch.long)
    if t.dim() != 1 or t.numel() != n:
        raise ValueError(
            f"{name} must be 1-D with one id per sample ({n}), got shape {tuple(t.shape)}"
        )
    if t.is_floating_point():
        raise ValueError(f"{name} must be integers, got {t.dtype}")
    return t.to(torch.long)


def make_group_ids(adapter_ids, prompt_ids) -> torch.Tensor:
    """One group id per distinct ``(adapter, prompt)`` pair.

    Args: ``adapter_ids [N]`` and ``prompt_ids [N]`` integer sequences or tensors.
    Returns: int64 ``[N]`` ids in ``0..G-1`` numbered in order of the sorted pairs.
    """
    a = _as_ids(adapter_ids, len(adapter_ids), "adapter_ids")
    p = _as_ids(prompt_ids, a.numel(), "prompt_ids")
    if a.numel() == 0:
        return torch.zeros(0, dtype=torch.long)
    return torch.unique(torch.stack([a, p], dim=1), dim=0, return_inverse=True)[1]


def _group_moments(values: torch.Tensor, valid: torch.Tensor, inv: torch.Tensor, G: int):
    """Per-group count, mean and unbiased std of ``values`` over ``valid`` entries.

    ``values``/``valid``/``inv`` are flat and aligned; std is NaN for groups with < 2 entries,
    as in TRL's ``nanstd``.
    """
    zeros = values.new_zeros(G, dtype=torch.float64)
    cnt = zeros.clone().index_add_(0, inv, valid.to(torch.float64))
    v0 = torch.where(valid, values, torch.zeros_like(values))
    mean = zeros.clone().index_add_(0, inv, v0) / cnt
    dev = torch.where(valid, values - mean[inv], torch.zeros_like(values))
    ss = zeros.clone().index_add_(0, inv, dev * dev)
    std = torch.where(cnt > 1, ss / (cnt - 1), torch.full_like(ss, float("nan"))).sqrt()
    return cnt, mean, std


def group_advantages(
    rewards,
    group_ids,
    scale: str = "std",
    eps: float = 1e-4,
    drop_zero_variance: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Group-normalised advantages, TRL's formula (see the module docstring).

    Args:
        rewards: ``[N]`` list of float/None or tensor; None/NaN = skipped sample.
        group_ids: ``[N]`` ints; one group per (adapter, prompt) pair (:func:`make_group_ids`).
            Groups need not be contiguous or equal-sized.
        scale: ``"std"`` divides by ``std + eps`` (GRPO); ``"none"`` only centres (Dr.GRPO).
        eps: added to the std, 1e-4 as in TRL.
        drop_zero_variance: also mark samples of zero-variance groups as not kept (DAPO's
            dynamic-sampling filter). A group with fewer than two scored samples counts as
            zero-variance; "zero" is TRL's ``isclose(std, 0)``, i.e. ``std <= 1e-8``.

    Returns:
        ``advantages [N]`` float32 (0 for skipped samples and for zero-variance groups, where the
        centred reward is 0 anyway); ``keep [N]`` bool, False for skipped samples and, if asked,
        for zero-variance groups (TRL keeps skipped samples with advantage 0; dropping them
        instead only changes loss normalisation); ``stats``: ``n_groups``, ``frac_zero_std``
        (share of samples in zero-variance groups, TRL's ``frac_reward_zero_std``),
        ``n_skipped``, ``n_dropped``, ``reward_mean``, ``reward_std``, ``adv_mean``, ``adv_std``
        (over kept samples; NaN when there are none).
    """
    _check_scale(scale)
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    r = _as_rewards(rewards)
    gid = _as_ids(group_ids, r.numel(), "group_ids")
    _, inv = torch.unique(gid, return_inverse=True)
    G = int(inv.max()) + 1 if inv.numel() else 0
    valid = ~torch.isnan(r)
    _, mean, std = _group_moments(r, valid, inv, G)

    adv = r - mean[inv]
    if scale == "std":
        adv = adv / (std[inv] + eps)
    # NaN for skipped samples and for one-sample groups (NaN std), zeroed as TRL's nan_to_num.
    adv = torch.nan_to_num(adv, nan=0.0)

    zero_var = ~(std[inv] > 1e-8)
    keep = valid & ~zero_var if drop_zero_variance else valid.clone()
    stats = {
        "n_groups": G,
        "frac_zero_std": float(zero_var.double().mean()) if r.numel() else 0.0,
        "n_skipped": int((~valid).sum()),
        "n_dropped": int((valid & ~keep).sum()),
        **_mean_std("reward", r[valid]),
        **_mean_std("adv", adv[keep]),
    }
    return adv.to(torch.float32), keep, stats


def _mean_std(name: str, x: torch.Tensor) -> dict[str, float]:
    """``{name}_mean`` and unbiased ``{name}_std`` for logging; NaN where undefined."""
    nan = float("nan")
    return {f"{name}_mean": float(x.mean()) if x.numel() else nan,
            f"{name}_std": float(x.std()) if x.numel() > 1 else nan}


def _check_token_inputs(x: torch.Tensor, mask: torch.Tensor, name: str) -> torch.Tensor:
    if x.dim() != 2:
        raise ValueError(f"{name} must be [B, L], got shape {tuple(x.shape)}")
    if mask.shape != x.shape:
        raise ValueError(
            f"mask must have the shape of {name} {tuple(x.shape)}, got {tuple(mask.shape)}"
        )
    return mask.to(x.device, torch.bool)


def token_returns(deposits: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """Return-to-go ``G_t = sum_{s >= t} gamma^(s-t) * d_s`` over the valid tokens of each row.

    Args: ``deposits [B, L]`` per-token rewards (e.g. the outcome on the last token, a process
    score on the last token of each step), ``mask [B, L]`` (1 = completion token), ``gamma``
    in (0, 1]; steps are counted in token positions, masked ones included.
    Returns: ``[B, L]`` float32, 0 where the mask is 0; deposits under mask 0 are ignored.

    ``gamma = 1`` is a reversed cumulative sum in float64 (a 4k-token row of +/-1 deposits stays
    exact); ``gamma < 1`` loops over L, since rescaling by ``gamma^-t`` overflows for long rows.
    """
    m = _check_token_inputs(deposits, mask, "deposits")
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"gamma must be in (0, 1], got {gamma}")
    d = torch.where(m, deposits.detach().to(torch.float64), torch.zeros((), dtype=torch.float64))
    if gamma == 1.0:
        g = d.flip(1).cumsum(1).flip(1)
    else:
        g = torch.empty_like(d)
        acc = d.new_zeros(d.shape[0])
        for t in range(d.shape[1] - 1, -1, -1):
            acc = d[:, t] + gamma * acc
            g[:, t] = acc
    return torch.where(m, g, torch.zeros_like(g)).to(torch.float32)


def token_advantages(
    values: torch.Tensor,
    mask: torch.Tensor,
    group_ids,
    scale: str = "std",
    eps: float = 1e-4,
) -> tuple[torch.Tensor, dict]:
    """Per-token advantages normalised per group: ``A_bt = (v_bt - mean_g) / (std_g + eps)``.

    ``mean_g``/``std_g`` (unbiased) run over every valid token of every row in row ``b``'s group,
    so a long completion weighs more than a short one: for an outcome reward with unequal
    lengths this differs from :func:`group_advantages`, which weighs completions equally.

    Args: ``values [B, L]`` (return-to-go or dense rewards), ``mask [B, L]``, ``group_ids [B]``
    (one per row, see :func:`make_group_ids`), ``scale`` ``"std" | "none"``, ``eps``.
    Returns: ``advantages [B, L]`` float32 (0 under mask 0 and in groups with < 2 valid tokens);
    ``stats``: ``n_groups``, ``adv_mean``, ``adv_std`` over valid tokens.
    """
    _check_scale(scale)
    m = _check_token_inputs(values, mask, "values")
    B, L = values.shape
    gid = _as_ids(group_ids, B, "group_ids")
    _, inv_row = torch.unique(gid, return_inverse=True)
    G = int(inv_row.max()) + 1 if B else 0
    inv_row = inv_row.to(values.device)
    v = values.detach().to(torch.float64)
    inv = inv_row[:, None].expand(B, L).reshape(-1)
    _, mean, std = _group_moments(v.reshape(-1), m.reshape(-1), inv, G)
    adv = v - mean[inv_row][:, None]
    if scale == "std":
        adv = adv / (std[inv_row][:, None] + eps)
    adv = torch.where(m, torch.nan_to_num(adv, nan=0.0), torch.zeros_like(adv))
    return adv.to(torch.float32), {"n_groups": G, **_mean_std("adv", adv[m])}


def _placed(deposits: torch.Tensor, m: torch.Tensor, placed) -> torch.Tensor:
    """Where rewards were deposited: ``placed`` [B, L] (an explicit 0 is a deposit too: a wrong
    answer's outcome), else the non-zero entries; always within the mask."""
    if placed is None:
        return (deposits != 0) & m
    if placed.shape != deposits.shape:
        raise ValueError(f"placed must have the shape of deposits {tuple(deposits.shape)}, got {tuple(placed.shape)}")
    return placed.to(m.device, torch.bool) & m


def deposit_density(deposits: torch.Tensor, mask: torch.Tensor, group_ids=None, placed=None) -> torch.Tensor:
    """Share of valid tokens that carry a deposit (``placed``, default: a non-zero value).

    Returns a 0-d tensor for the batch, or ``[B]`` (each row gets its group's density) when
    ``group_ids [B]`` is given. An outcome reward has density 1/length, a process reward
    steps/length, a per-token distillation reward 1.
    """
    m = _check_token_inputs(deposits, mask, "deposits")
    hit = _placed(deposits, m, placed)
    if group_ids is None:
        return hit.sum().double() / m.sum().clamp_min(1).double()
    gid = _as_ids(group_ids, deposits.shape[0], "group_ids")
    _, inv = torch.unique(gid, return_inverse=True)
    G = int(inv.max()) + 1 if inv.numel() else 0
    inv = inv.to(deposits.device)
    hits = hit.new_zeros(G, dtype=torch.float64).index_add_(0, inv, hit.sum(1).double())
    valid = hit.new_zeros(G, dtype=torch.float64).index_add_(0, inv, m.sum(1).double())
    return (hits / valid.clamp_min(1))[inv]


# Dense above this density: more than one deposit per two valid tokens. An outcome reward (one
# deposit per row) is sparse from two tokens on, a process reward whenever its steps average two
# tokens or more, a per-token distillation reward (density 1) is dense.
DENSE_THRESHOLD = 0.5


def deposit_advantages(
    deposits: torch.Tensor,
    mask: torch.Tensor,
    group_ids,
    placed=None,
    dense_threshold: float = DENSE_THRESHOLD,
    gamma: float = 1.0,
    scale: str = "std",
    eps: float = 1e-4,
) -> tuple[torch.Tensor, dict]:
    """Per-token advantages from per-token deposits, branching on deposit density (study C).

    Per group g (one adapter, one prompt), with D_g its deposits (the ``placed`` tokens of its rows):

    - sparse (density <= ``dense_threshold``), DeepSeekMath 4.1.3 process supervision: normalise
      each deposit over the group's deposits, ``d~ = (d - mean(D_g)) / (std(D_g) + eps)``, then
      the return-to-go of the normalised deposits, ``A_bt = sum_{s >= t} gamma^(s-t) d~_bs``. One
      outcome deposit per row gives every token exactly :func:`group_advantages`' value.
    - dense (density > ``dense_threshold``, e.g. distillation ``r_t = log pi_T - log pi``): per-token
      group normalisation of the deposits themselves (0 on unplaced valid tokens),
      :func:`token_advantages`.

    The branch reads the measured density only, never the name of the reward; groups of either
    kind can share a batch (one adapter per regime). std is unbiased, NaN (hence 0) below two
    deposits or tokens, as in TRL; ``scale="none"`` only centres.

    Args: ``deposits [B, L]``, ``mask [B, L]``, ``group_ids [B]``, ``placed [B, L]`` bool (default:
    the non-zero deposits; pass it when a deposit may be exactly 0), ``dense_threshold`` in
    [0, 1), ``gamma`` in (0, 1], ``scale``, ``eps``.
    Returns: ``advantages [B, L]`` float32 (0 under mask 0); ``stats``: ``n_groups``,
    ``adv_mean``, ``adv_std`` (over valid tokens), ``frac_dense_rows``, ``deposit_density`` (batch).
    """
    if not 0.0 <= dense_threshold < 1.0:
        raise ValueError(f"dense_threshold must be in [0, 1), got {dense_threshold}")
    _check_scale(scale)
    m = _check_token_inputs(deposits, mask, "deposits")
    hit = _placed(deposits, m, placed)
    B, L = deposits.shape
    gid = _as_ids(group_ids, B, "group_ids")
    dense = deposit_density(deposits, m, gid, placed=hit) > dense_threshold
    _, inv_row = torch.unique(gid, return_inverse=True)
    G = int(inv_row.max()) + 1 if B else 0
    inv_row = inv_row.to(deposits.device)
    d = torch.where(hit, deposits.detach().to(torch.float64), torch.zeros((), dtype=torch.float64, device=m.device))
    _, mean, std = _group_moments(d.reshape(-1), hit.reshape(-1), inv_row[:, None].expand(B, L).reshape(-1), G)
    norm = d - mean[inv_row][:, None]
    if scale == "std":
        norm = norm / (std[inv_row][:, None] + eps)
    norm = torch.where(hit, torch.nan_to_num(norm, nan=0.0), torch.zeros_like(norm))
    sparse_adv = token_returns(norm, m, gamma)
    dense_adv, _ = token_advantages(d, m, gid, scale=scale, eps=eps)
    adv = torch.where(dense.to(m.device)[:, None], dense_adv, sparse_adv)
    stats = {"n_groups": G, **_mean_std("adv", adv[m].double()),
             "frac_dense_rows": float(dense.double().mean()) if dense.numel() else 0.0,
             "deposit_density": float(deposit_density(deposits, m, placed=hit))}
    return adv, stats
