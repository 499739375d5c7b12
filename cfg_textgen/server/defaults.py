"""Server-side defaults (`serve --preset NAME|FILE --cfg-scale X --opposing TEXT`) for clients that
cannot send CFG (Kobold Lite, most chat clients): every request gets them unless it says otherwise.

Precedence, field by field: the request's field > the server default > the built-in default.

- CFG scale: the request's `guidance_scale` > `--cfg-scale` > the `--preset`'s `cfg.scale` > 1.
- Opposing prompt: the request's `negative_prompt` > `--opposing` > the preset's > "" (a blank story).
  The preset's `opposing_mode` applies with its own opposing prompt only.
- Samplers: a request that sends any sampler field gets the samplers it describes (missing fields
  at its API's defaults, as the app it imitates would); one that sends none gets the `--preset`'s
  chain (and its greedy/sampling choice). The two chains are not mixed field by field: neither the
  client nor the preset's author tuned such a mixture.
Length and stop strings always come from the request (its API's defaults when it sends none).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServerDefaults:
    preset: object = None  # presets.Preset or None
    cfg_scale: float | None = None
    opposing: str | None = None

    @property
    def empty(self) -> bool:
        return self.preset is None and self.cfg_scale is None and self.opposing is None

    def apply(self, data: dict, body: dict, scale_key: str, opposing_key: str, sampler_keys) -> dict:
        """Our preset dict `data`, translated from the request `body`, with the defaults filled in
        where the body is silent (`*_key`: the API's names for the fields)."""
        if self.empty:
            return data
        base = self.preset.to_dict() if self.preset is not None else None
        if base is not None and not any(k in body for k in sampler_keys):
            data["samplers"], data["do_sample"] = base["samplers"], base["do_sample"]
        cfg = dict(data.get("cfg") or {"scale": 1.0, "opposing_prompt": "", "opposing_mode": "text"})
        preset_cfg = base["cfg"] if base is not None else {}
        if scale_key not in body:
            cfg["scale"] = self.cfg_scale if self.cfg_scale is not None else preset_cfg.get("scale", cfg["scale"])
        if opposing_key in body:  # the importer may have left it out, its own scale being 1
            cfg["opposing_prompt"], cfg["opposing_mode"] = body[opposing_key], "text"
        else:
            if self.opposing is not None:
                cfg["opposing_prompt"], cfg["opposing_mode"] = self.opposing, "text"
            elif preset_cfg:
                cfg["opposing_prompt"] = preset_cfg["opposing_prompt"]
                cfg["opposing_mode"] = preset_cfg["opposing_mode"]
        data["cfg"] = cfg
        return data

    def describe(self) -> str:
        """One line for the start-up log."""
        parts = []
        if self.preset is not None:
            parts.append(f"preset {self.preset.name!r}")
        if self.cfg_scale is not None:
            parts.append(f"CFG scale {self.cfg_scale:g}")
        if self.opposing is not None:
            parts.append(f"opposing prompt {self.opposing!r}" if self.opposing else "a blank opposing prompt")
        return "defaults for requests that do not set them: " + ", ".join(parts)
