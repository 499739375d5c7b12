"""llama.cpp server's `/completion` request (tools/server/README.md) as our preset, by the same
`ooba_chain` that reads text-generation-webui presets (textgen_webui.py): llama.cpp's names are
mapped onto the web UI's, then its `samplers` list becomes the order.

Semantics (llama.cpp tools/server, common/sampling.cpp):
- Missing fields take llama.cpp server's defaults: temperature 0.8, top_k 40, top_p 0.95, min_p
  0.05, repeat_last_n 64, dry_allowed_length 2, dry_base 1.75, xtc_threshold 0.1, mirostat_tau 5,
  mirostat_eta 0.1; the rest are off.
- `samplers` (names, or a string of letters as `--sampling-seq`) is the order, default
  penalties, dry, top_n_sigma, top_k, typ_p, top_p, min_p, xtc, temperature. A sampler not in the
  list does not run; an unknown name is skipped (llama.cpp skips it with a warning).
- `dynatemp_range` r > 0 makes temperature t dynamic over [t - r, t + r].
- `repeat_last_n` -1 is the whole context, 0 turns the penalties off; `top_n_sigma` <= 0 is off.
- `mirostat` 1 or 2 replaces the truncation samplers (penalties and temperature stay).
- `adaptive_target` / `adaptive_decay`: Adaptive-P, where `samplers` lists `adaptive_p` (on for a
  target above 0, the web UI's rule; llama.cpp's is "not negative", so a target of exactly 0 differs).
- `guidance_scale` / `negative_prompt`: CFG (SillyTavern sends them to every Text Completion type).
- `logit_bias`: `[[token id, bias or false], ...]` or `{"token id": bias or false}`, added as
  given (false bans the token); texts in it are tokenized by the server before this.
- `grammar`: a GBNF grammar (the preset's grammar). Its `json_schema` needs the backend's converter:
  the server turns it into a `grammar` before it comes here (server/llamacpp.py).
"""

from __future__ import annotations

from ._common import Builder, grammar_key
from .steering import add_llamacpp_bias
from .textgen_webui import DEFAULTS as WEBUI_DEFAULTS
from .textgen_webui import ooba_chain

# llama.cpp name -> the web UI's name for the same setting
NAMES = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
         "typical_p": "typical_p", "tfs_z": "tfs", "top_n_sigma": "top_n_sigma",
         "repeat_penalty": "repetition_penalty", "repeat_last_n": "repetition_penalty_range",
         "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
         "dry_multiplier": "dry_multiplier", "dry_base": "dry_base", "dry_allowed_length": "dry_allowed_length",
         "dry_sequence_breakers": "dry_sequence_breakers", "xtc_probability": "xtc_probability",
         "xtc_threshold": "xtc_threshold", "mirostat": "mirostat_mode", "mirostat_tau": "mirostat_tau",
         "mirostat_eta": "mirostat_eta", "adaptive_target": "adaptive_target", "adaptive_decay": "adaptive_decay",
         "guidance_scale": "guidance_scale", "negative_prompt": "negative_prompt"}
DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05, "repeat_last_n": 64}
DEFAULT_ORDER = ["penalties", "dry", "top_n_sigma", "top_k", "typ_p", "top_p", "min_p", "xtc", "temperature"]
LETTERS = {"e": "penalties", "d": "dry", "s": "top_n_sigma", "k": "top_k", "y": "typ_p", "p": "top_p",
           "m": "min_p", "x": "xtc", "t": "temperature", "f": "tfs_z"}
# llama.cpp sampler name (and its aliases) -> the web UI's slots it fills
SLOTS = {"penalties": ["repetition_penalty"], "dry": ["dry"], "top_n_sigma": ["top_n_sigma"], "top_k": ["top_k"],
         "typ_p": ["typical_p"], "typical_p": ["typical_p"], "typical": ["typical_p"], "top_p": ["top_p"],
         "nucleus": ["top_p"], "min_p": ["min_p"], "xtc": ["xtc"], "tfs_z": ["tfs"], "tfs": ["tfs"],
         "temperature": ["temperature", "dynamic_temperature"], "temp": ["temperature", "dynamic_temperature"],
         "adaptive_p": ["adaptive_p"]}
# the fields of each slot: left out when the slot is not in `samplers` (llama.cpp does not run it)
SLOT_FIELDS = {"repetition_penalty": ["repeat_penalty", "presence_penalty", "frequency_penalty"],
               "dry": ["dry_multiplier"], "top_n_sigma": ["top_n_sigma"], "top_k": ["top_k"],
               "typical_p": ["typical_p"], "top_p": ["top_p"], "min_p": ["min_p"], "xtc": ["xtc_probability"],
               "tfs": ["tfs_z"], "temperature": ["temperature", "dynatemp_range"], "adaptive_p": ["adaptive_target"]}
REQUEST_KEYS = set(NAMES) | {"samplers", "dynatemp_range", "dynatemp_exponent"}
ORDER_KEY = "samplers"


def import_request(body: dict, source: str = "request", vocab_size: int | None = None):
    """The sampler fields of a llama.cpp server `/completion` request as our preset dict and its
    report. Bad values raise PresetError naming the key."""
    fields = dict(DEFAULTS) | {k: v for k, v in body.items() if k in REQUEST_KEYS | {"grammar", "logit_bias"}}
    b = Builder(source, "llama.cpp server request", fields)
    order = _order(b)
    slots = [slot for name in order for slot in SLOTS[name]]
    for slot, keys in SLOT_FIELDS.items():
        if slot not in slots:
            for key in keys:
                if key in body:
                    b.dropped(key, f"`{ORDER_KEY}` does not list this sampler: llama.cpp does not run it")
                fields.pop(key, None)
    _derived(b, fields)
    keys = {canon: key for key, canon in NAMES.items()} | {"sampler_priority": ORDER_KEY}
    keys |= {k: k for k in ("dynamic_temperature", "dynatemp_low", "dynatemp_high", "dynatemp_exponent")}
    b.data[ORDER_KEY] = slots
    ooba_chain(b, keys, {**WEBUI_DEFAULTS, "repetition_penalty_range": 64}, ORDER_KEY)
    grammar_key(b, "grammar")
    add_llamacpp_bias(b, vocab_size=vocab_size)
    return b.finish(None, "request", "A llama.cpp server request."), b.report


def _order(b: Builder) -> list[str]:
    """`samplers` as llama.cpp names (known ones, once each), or llama.cpp's default order."""
    if not b.has(ORDER_KEY):
        return list(DEFAULT_ORDER)
    raw = b.data[ORDER_KEY]
    if isinstance(raw, str):
        raw = [LETTERS.get(ch, ch) for ch in raw]
    if not isinstance(raw, list) or not all(isinstance(x, str) for x in raw):
        raise b.error(ORDER_KEY, f"must be a list of sampler names or a string of letters, got {raw!r}")
    known = [n for n in dict.fromkeys(raw) if n in SLOTS]
    skipped = [n for n in raw if n not in SLOTS]
    if skipped:
        b.report.skipped.extend(skipped)
        b.note(f"`{ORDER_KEY}`: skipped {', '.join(map(repr, skipped))} (not samplers cfg-textgen has; "
               "llama.cpp skips unknown names too).")
    return known


def _derived(b: Builder, fields: dict) -> None:
    """llama.cpp's special values, as the web UI settings they mean."""
    last_n = b.num("repeat_last_n", integer=True) if "repeat_last_n" in fields else None
    if last_n == 0 and "repeat_penalty" in fields:  # (not there when `samplers` leaves penalties out)
        fields["repeat_penalty"] = 1  # 0: penalties off
    elif last_n is not None and last_n < 0:
        fields["repeat_last_n"] = 0  # -1: the whole context (our range 0)
    sigma = b.num("top_n_sigma") if "top_n_sigma" in fields else None
    if sigma is not None and sigma <= 0:
        fields.pop("top_n_sigma")  # -1 (the default): off
    spread = b.num("dynatemp_range", 0.0) if "dynatemp_range" in fields else 0.0
    if spread > 0 and "temperature" in fields:
        t = b.num("temperature")
        fields.update(dynamic_temperature=True, dynatemp_low=max(0.0, t - spread), dynatemp_high=t + spread)
        fields.setdefault("dynatemp_exponent", 1.0)
