"""Synthetic UNSW-NB15 flows: rows in the real CSV's raw layout, with its pathology and a learnable label.

The data of the default search space and of the tests: no download, and the study's point on a few
thousand rows."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

__all__ = ["synthetic_frame"]

# Rare protocol names (each a small share of the rows), as in the real sample's long tail.
_RARE_PROTOS = ("sctp", "any", "gre", "rsvp", "pim", "swipe", "ipip", "mobile", "sun-nd", "visa", "ggp",
                "igmp", "ipv6", "ipv6-frag", "isis", "etherip", "l2tp", "egp", "idrp", "ipcomp")


def _pick(rng: np.random.Generator, choices: tuple, p: tuple[float, ...] | np.ndarray, n: int) -> np.ndarray:
    p = np.asarray(p, dtype=np.float64)
    return np.asarray(choices)[rng.choice(len(choices), size=n, p=p / p.sum())]


def synthetic_frame(n_rows: int, seed: int) -> pd.DataFrame:
    """``n_rows`` (>= 1) synthetic flows: ``id``, the 42 features, ``label``; the same seed, the same frame.

    Integer features in [0, 255] sit beside 1e9-sized counters, with heavy tails and rare categories.
    The label depends non-linearly on mostly small-scale features plus noise, so one global mean/std
    hides it: with ``global`` scaling a Mixer stays near the majority rate."""
    if n_rows < 1:
        raise ValueError(f"n_rows must be >= 1, got n_rows={n_rows}")
    rng = np.random.default_rng(seed)
    n = n_rows
    # Latent flow kind: 0 TCP session, 1 UDP DNS, 2 other UDP, 3 another protocol.
    kind = rng.choice(4, size=n, p=[0.52, 0.26, 0.12, 0.10])
    tcp, dns, udp, other = (kind == k for k in range(4))

    proto = np.where(tcp, "tcp", "udp").astype(object)
    proto[other] = _pick(rng, ("unas", "arp", "ospf") + _RARE_PROTOS,
                         (0.55, 0.15, 0.08) + (0.011,) * len(_RARE_PROTOS), int(other.sum()))
    service = np.full(n, "-", dtype=object)
    service[tcp] = _pick(rng, ("-", "http", "smtp", "ftp", "ftp-data", "pop3", "ssh", "ssl", "irc"),
                         (0.42, 0.26, 0.09, 0.07, 0.08, 0.04, 0.03, 0.008, 0.002), int(tcp.sum()))
    service[dns] = "dns"
    service[udp] = _pick(rng, ("-", "dhcp", "snmp", "radius"), (0.94, 0.03, 0.02, 0.01), int(udp.sum()))
    state = np.empty(n, dtype=object)
    state[tcp] = _pick(rng, ("FIN", "CON", "REQ", "ACC", "CLO"), (0.84, 0.12, 0.03, 0.006, 0.004),
                       int(tcp.sum()))
    state[dns | udp] = _pick(rng, ("INT", "CON", "REQ"), (0.70, 0.26, 0.04), int((dns | udp).sum()))
    state[other] = _pick(rng, ("INT", "REQ"), (0.96, 0.04), int(other.sum()))
    is_int = state == "INT"

    # Packets, sizes and durations: log-normal, with interrupted (INT) flows one-sided and short.
    spkts = np.clip(np.round(rng.lognormal(np.where(tcp, 2.3, 0.6), 1.1)), 1, 9400).astype(np.int64)
    dpkts = np.where(is_int, 0, np.round(rng.lognormal(np.where(tcp, 2.2, 0.4), 1.1))).astype(np.int64)
    dpkts = np.minimum(dpkts, 3500)
    # Integer-valued floats here; the columns get their CSV dtypes at the end.
    smean = np.clip(np.round(rng.lognormal(np.log(np.where(dns, 90.0, 140.0)), 0.75)), 28, 1504)
    dmean = np.where(dpkts > 0, np.clip(np.round(rng.lognormal(np.log(180.0), 1.0, n)), 28, 1500), 0)
    sbytes = spkts * smean
    dbytes = dpkts * dmean
    dur = np.where(is_int, rng.uniform(1e-6, 1e-5, n), np.minimum(rng.lognormal(-1.0, 1.6, n), 60.0))
    dur = np.round(dur, 6)
    with np.errstate(divide="ignore", invalid="ignore"):
        rate = np.minimum(np.where(dur > 0, (spkts + dpkts - 1) / dur, 0.0), 1e6)
        sload = np.minimum(np.where(dur > 0, sbytes * 8.0 / dur, 0.0), 5.3e9)
        dload = np.minimum(np.where(dur > 0, dbytes * 8.0 / dur, 0.0), 2.1e7)
        sinpkt = np.where(spkts > 1, dur * 1000.0 / np.maximum(spkts - 1, 1), 0.0)
        dinpkt = np.where(dpkts > 1, dur * 1000.0 / np.maximum(dpkts - 1, 1), 0.0)
    sjit = np.where(spkts > 2, sinpkt * rng.lognormal(0.0, 1.2, n), 0.0)
    djit = np.where(dpkts > 2, dinpkt * rng.lognormal(-0.5, 1.2, n), 0.0)
    sloss = rng.binomial(np.maximum(spkts // 3, 0), 0.08)
    dloss = rng.binomial(np.maximum(dpkts // 3, 0), 0.08)

    # TTLs: a handful of values; 254 and 62 are the attackers' (as in the real sample).
    sttl = np.where(tcp, _pick(rng, (31, 62, 254, 29), (0.50, 0.22, 0.18, 0.10), n),
                    _pick(rng, (31, 254, 60, 0, 62), (0.35, 0.40, 0.12, 0.05, 0.08), n)).astype(np.int64)
    dttl = np.where(dpkts > 0, _pick(rng, (29, 252, 253, 60), (0.45, 0.40, 0.05, 0.10), n), 0)
    has_win = tcp & ~is_int
    swin = np.where(has_win, 255, 0).astype(np.int64)
    dwin = np.where(has_win & (dpkts > 0), 255, 0).astype(np.int64)
    seq = has_win & np.isin(state, ("FIN", "CON"))
    stcpb = np.where(seq, rng.integers(1, 2**32 - 1, n), 0).astype(np.int64)
    dtcpb = np.where(seq & (dpkts > 0), rng.integers(1, 2**32 - 1, n), 0).astype(np.int64)
    synack = np.where(seq, np.round(rng.lognormal(-4.5, 1.2, n), 6), 0.0)
    ackdat = np.where(seq, np.round(rng.lognormal(-4.2, 1.0, n), 6), 0.0)
    tcprtt = synack + ackdat

    http = service == "http"
    ftp = (service == "ftp") | (service == "ftp-data")
    trans_depth = np.where(http, rng.integers(0, 3, n), 0).astype(np.int64)
    response_body_len = np.where(http & (dpkts > 0), np.round(rng.lognormal(7.0, 2.5, n)), 0)
    response_body_len = np.minimum(response_body_len, 2.1e6).astype(np.int64)
    is_ftp_login = (ftp & (rng.random(n) < 0.25)).astype(np.int64)
    ct_ftp_cmd = is_ftp_login.copy()
    ct_flw_http_mthd = np.where(http, rng.poisson(0.6, n), 0).astype(np.int64)
    is_sm_ips_ports = (rng.random(n) < 0.01).astype(np.int64)

    # Connection counts share a per-row burst intensity, so they are correlated, heavy-tailed.
    burst = rng.lognormal(1.2, 0.9, n)

    def count(scale: float, cap: int) -> np.ndarray:
        return np.clip(rng.poisson(burst * scale), 1, cap).astype(np.int64)

    ct_srv_src = count(1.5, 59)
    ct_dst_ltm = count(0.9, 59)
    ct_src_dport_ltm = count(0.8, 59)
    ct_dst_sport_ltm = count(0.6, 37)
    ct_dst_src_ltm = count(1.2, 63)
    ct_src_ltm = count(1.0, 60)
    ct_srv_dst = count(1.5, 59)
    ct_state_ttl = np.select([is_int & (sttl == 254), sttl == 254, sttl == 62, state == "REQ"],
                             [2, 3, 1, 6], 0).astype(np.int64)

    # The label: a noisy threshold on a non-linear score of mostly small-scale features.
    sessions = np.isin(service, ("http", "ftp", "ftp-data", "smtp"))
    score = (
        1.9 * (sttl == 254) + 1.1 * (sttl == 62)
        + 1.4 * np.exp(-(((np.log(smean) - np.log(100.0)) / 0.35) ** 2))
        + 1.2 * np.tanh((ct_srv_src - 10.0) / 4.0)
        + 1.2 * (is_int & (ct_dst_src_ltm > 6))
        - 1.6 * (sessions & (dbytes > 3000))
        + 1.0 * np.isin(proto, _RARE_PROTOS)
        - 0.8 * (dur > 2.0)
    )
    label = (score + rng.logistic(0.0, 0.2, n) > 0.11).astype(np.int64)

    columns: dict[str, Any] = {
        "id": np.arange(1, n + 1, dtype=np.int64),
        "dur": dur, "proto": proto, "service": service, "state": state, "spkts": spkts, "dpkts": dpkts,
        "sbytes": sbytes, "dbytes": dbytes, "rate": rate, "sttl": sttl, "dttl": dttl,
        "sload": sload, "dload": dload, "sloss": sloss, "dloss": dloss, "sinpkt": sinpkt,
        "dinpkt": dinpkt, "sjit": sjit, "djit": djit, "swin": swin, "stcpb": stcpb, "dtcpb": dtcpb,
        "dwin": dwin, "tcprtt": tcprtt, "synack": synack, "ackdat": ackdat, "smean": smean,
        "dmean": dmean, "trans_depth": trans_depth, "response_body_len": response_body_len,
        "ct_srv_src": ct_srv_src, "ct_state_ttl": ct_state_ttl, "ct_dst_ltm": ct_dst_ltm,
        "ct_src_dport_ltm": ct_src_dport_ltm, "ct_dst_sport_ltm": ct_dst_sport_ltm,
        "ct_dst_src_ltm": ct_dst_src_ltm, "is_ftp_login": is_ftp_login, "ct_ftp_cmd": ct_ftp_cmd,
        "ct_flw_http_mthd": ct_flw_http_mthd, "ct_src_ltm": ct_src_ltm, "ct_srv_dst": ct_srv_dst,
        "is_sm_ips_ports": is_sm_ips_ports, "label": label,
    }
    # Imported here, not at the top: mixer.data imports this module to offer synthetic_frame too.
    from mixer.data import CATEGORICAL, FEATURE_NAMES, FLOAT_FEATURES

    dtypes = {name: "str" if name in CATEGORICAL else np.float64 if name in FLOAT_FEATURES else np.int64
              for name in FEATURE_NAMES}
    return pd.DataFrame(columns).astype(dtypes)
