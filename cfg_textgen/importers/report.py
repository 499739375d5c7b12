"""The import/export report: what happened to every source key, plus the decisions taken."""

from __future__ import annotations

from dataclasses import dataclass, field

MAPPED = "mapped"
NEUTRAL = "neutral"
DROPPED = "not carried over"
STATUSES = (MAPPED, NEUTRAL, DROPPED)


@dataclass(frozen=True)
class Entry:
    key: str  # the source key, dotted for nested ones ("parameters.top_k")
    status: str  # one of STATUSES
    detail: str  # mapped: to what; neutral: why it is off; not carried over: the reason
    value: object = None


@dataclass
class Report:
    """Every source key exactly once (mapped / neutral / not carried over), plus notes."""

    source: str
    format: str
    entries: dict[str, Entry] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # sampler-order entries a request named that are not samplers here, skipped (the apps skip them)
    skipped: list[str] = field(default_factory=list)

    def add(self, key: str, status: str, detail: str, value: object = None) -> None:
        if status not in STATUSES:
            raise ValueError(f"`status` must be one of {STATUSES}, but is {status!r}")
        if key in self.entries:  # a bug in an importer, not a user error
            raise RuntimeError(f"report: key {key!r} reported twice")
        self.entries[key] = Entry(key, status, detail, value)

    def mapped(self, key: str, detail: str, value: object = None) -> None:
        self.add(key, MAPPED, detail, value)

    def neutral(self, key: str, detail: str, value: object = None) -> None:
        self.add(key, NEUTRAL, detail, value)

    def dropped(self, key: str, detail: str, value: object = None) -> None:
        self.add(key, DROPPED, detail, value)

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def keys(self, status: str | None = None) -> list[str]:
        return [k for k, e in self.entries.items() if status is None or e.status == status]

    def status(self, key: str) -> str:
        return self.entries[key].status

    def render(self) -> str:
        """Readable text: one section per status, then the notes."""
        lines = [f"{self.source}: {self.format}"]
        titles = {MAPPED: "mapped", NEUTRAL: "neutral (value means off)", DROPPED: "not carried over"}
        for status in STATUSES:
            group = [e for e in self.entries.values() if e.status == status]
            if not group:
                continue
            lines.append(f"  {titles[status]} ({len(group)}):")
            width = max(len(e.key) for e in group)
            for e in group:
                shown = "" if e.value is None else f" = {_short(e.value)}"
                lines.append(f"    {e.key.ljust(width)}{shown}  ->  {e.detail}")
        if self.notes:
            lines.append("  notes:")
            lines.extend(f"    - {n}" for n in self.notes)
        return "\n".join(lines)


def _short(value: object, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
