"""The artifact's contract: ``metadata.json`` parsed and validated, and what it names.

Everything about the model (input size, labels, threshold, temperature, risk tiers, TTA,
version) comes from the artifact's ``metadata.json`` (docs/ARTIFACT.md); nothing is hard-coded.
:class:`ModelMetadata` is the validated subset the server acts on; ``load_domain_calibration``
and ``load_domain_thresholds`` read and check the optional per-domain calibration it names.
Any violation is a :class:`ModelLoadError` naming the bad field. No runtime is imported here.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model_training.domain_calibration import DomainCalibration
from model_training.preprocessing import TTA_VIEWS

SUPPORTED_SCHEMA_VERSIONS = (1,)
# Outputs the server itself needs, whatever else metadata lists.
REQUIRED_OUTPUTS: dict[str, tuple[str, ...]] = {
    "serve": ("logit",),
    "explain": ("logit", "heatmap"),
}
# The serve output the OOD gate scores when metadata's ``ood`` does not name one (artifacts
# older than ``ood.embedding_output``).
DEFAULT_OOD_OUTPUT = "embedding"
# TTA flips the server knows how to apply; metadata picks among them.
KNOWN_FLIPS = TTA_VIEWS  # the views model_training.evaluate measures


class ModelLoadError(RuntimeError):
    """The artifact is missing, malformed, or disagrees with its own metadata."""


@dataclass(frozen=True)
class RiskTier:
    """One probability band of ``risk_tiers``: ``lower <= p < upper`` (the last includes 1)."""

    name: str
    lower: float
    upper: float
    advice: str | None = None  # optional per-tier wording supplied by the artifact


@dataclass(frozen=True)
class ModelMetadata:
    """The validated subset of metadata.json the server acts on, plus the raw document."""

    raw: Mapping[str, Any]
    name: str
    version: str
    labels: tuple[str, str]
    positive_label: str
    input_height: int
    input_width: int
    endpoints: Mapping[str, tuple[str, ...]]
    temperature: float
    logit_bias: float
    threshold: float
    risk_tiers: tuple[RiskTier, ...]
    tta_flips: tuple[str, ...]
    quality: Mapping[str, float] | None
    ood: Mapping[str, Any] | None

    @property
    def negative_label(self) -> str:
        """The label that is not ``positive_label``."""
        return self.labels[0] if self.labels[1] == self.positive_label else self.labels[1]

    @property
    def ood_embedding_output(self) -> str:
        """The serve output the OOD gate scores (``ood.embedding_output``, default embedding)."""
        if self.ood is None:
            return DEFAULT_OOD_OUTPUT
        return str(self.ood.get("embedding_output", DEFAULT_OOD_OUTPUT))

    @property
    def input_size(self) -> tuple[int, int]:
        """(height, width) the endpoints expect."""
        return self.input_height, self.input_width

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> ModelMetadata:
        """Validate ``raw`` against the contract; raise ModelLoadError naming the bad field."""

        def fail(msg: str) -> ModelLoadError:
            return ModelLoadError(f"metadata.json: {msg}")

        version = raw.get("schema_version")
        if version not in SUPPORTED_SCHEMA_VERSIONS:
            raise fail(f"schema_version {version!r} is not supported {SUPPORTED_SCHEMA_VERSIONS}")

        labels = raw.get("labels")
        if (
            not isinstance(labels, list)
            or len(labels) != 2
            or not all(isinstance(x, str) and x for x in labels)
            or labels[0] == labels[1]
        ):
            raise fail(f"labels must be two distinct strings, got {labels!r}")
        positive = raw.get("positive_label")
        if positive not in labels:
            raise fail(f"positive_label {positive!r} is not one of labels {labels!r}")

        inp = raw.get("input")
        if not isinstance(inp, Mapping):
            raise fail("input is missing")
        try:
            height, width = int(inp["height"]), int(inp["width"])
            channels = int(inp.get("channels", 3))
        except (KeyError, TypeError, ValueError) as exc:
            raise fail(f"input.height/width must be integers ({exc})") from exc
        if height < 8 or width < 8 or channels != 3:
            raise fail(
                f"input must be at least 8x8 with 3 channels, got {height}x{width}x{channels}"
            )
        if str(inp.get("color", "RGB")).upper() != "RGB":
            raise fail(f"input.color {inp.get('color')!r} is not RGB")

        endpoints_raw = raw.get("endpoints")
        if not isinstance(endpoints_raw, Mapping):
            raise fail("endpoints is missing")
        endpoints: dict[str, tuple[str, ...]] = {}
        for name, required in REQUIRED_OUTPUTS.items():
            outputs = endpoints_raw.get(name)
            if not isinstance(outputs, list) or not all(isinstance(o, str) for o in outputs):
                raise fail(f"endpoints.{name} must list its outputs")
            missing = [o for o in required if o not in outputs]
            if missing:
                raise fail(f"endpoints.{name} lacks {missing}")
            endpoints[name] = tuple(outputs)

        temperature = _finite(raw.get("temperature", 1.0), "temperature", fail)
        if temperature <= 0:
            raise fail(f"temperature must be > 0, got {temperature}")
        logit_bias = _finite(raw.get("logit_bias", 0.0), "logit_bias", fail)
        threshold = _finite(raw.get("threshold"), "threshold", fail)
        if not 0.0 < threshold < 1.0:
            raise fail(f"threshold must be in (0, 1), got {threshold}")

        risk_tiers = _parse_tiers(raw.get("risk_tiers"), fail)

        tta = raw.get("tta") or {}
        if not isinstance(tta, Mapping):
            raise fail("tta must be an object")
        flips: tuple[str, ...] = ()
        if tta.get("enabled"):
            flips = tuple(tta.get("flips", KNOWN_FLIPS))
            unknown = [f for f in flips if f not in KNOWN_FLIPS]
            if unknown or not flips:
                raise fail(f"tta.flips must be a non-empty subset of {KNOWN_FLIPS}, got {flips}")

        quality = raw.get("quality")
        if quality is not None and not isinstance(quality, Mapping):
            raise fail("quality must be an object of thresholds")
        ood = raw.get("ood")
        if ood is not None:
            if not isinstance(ood, Mapping) or "file" not in ood or "threshold" not in ood:
                raise fail("ood must be an object with file and threshold")
            output = ood.get("embedding_output", DEFAULT_OOD_OUTPUT)
            if not isinstance(output, str) or not output:
                raise fail(f"ood.embedding_output must name a serve output, got {output!r}")
            if output not in endpoints["serve"]:
                raise fail(
                    f"ood.embedding_output {output!r} is not an output of endpoints.serve "
                    f"{list(endpoints['serve'])}"
                )

        return cls(
            raw=raw,
            name=str(raw.get("name", "model")),
            version=str(raw.get("version", "unknown")),
            labels=(labels[0], labels[1]),
            positive_label=str(positive),
            input_height=height,
            input_width=width,
            endpoints=endpoints,
            temperature=temperature,
            logit_bias=logit_bias,
            threshold=threshold,
            risk_tiers=risk_tiers,
            tta_flips=flips,
            quality=quality,
            ood=ood,
        )


def _finite(value: Any, name: str, fail: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError) as exc:
        raise fail(f"{name} must be a number, got {value!r}") from exc
    if not math.isfinite(number):
        raise fail(f"{name} must be finite, got {number}")
    return number


def _parse_tiers(raw: Any, fail: Any) -> tuple[RiskTier, ...]:
    """Tiers must tile [0, 1] without gaps or overlaps, in ascending order."""
    if not isinstance(raw, list) or not raw:
        raise fail("risk_tiers must be a non-empty list")
    tiers: list[RiskTier] = []
    for i, item in enumerate(raw):
        if not isinstance(item, Mapping) or not item.get("name"):
            raise fail(f"risk_tiers[{i}] needs a name")
        lower = _finite(item.get("lower"), f"risk_tiers[{i}].lower", fail)
        upper = _finite(item.get("upper"), f"risk_tiers[{i}].upper", fail)
        if not lower < upper:
            raise fail(f"risk_tiers[{i}] has lower >= upper")
        advice = item.get("advice")
        tiers.append(RiskTier(str(item["name"]), lower, upper, str(advice) if advice else None))
    if not math.isclose(tiers[0].lower, 0.0) or not math.isclose(tiers[-1].upper, 1.0):
        raise fail("risk_tiers must start at 0 and end at 1")
    for prev, nxt in itertools.pairwise(tiers):
        if not math.isclose(prev.upper, nxt.lower, abs_tol=1e-9):
            raise fail(f"risk_tiers {prev.name!r} and {nxt.name!r} are not contiguous")
    return tuple(tiers)


def load_domain_calibration(metadata: ModelMetadata, model_dir: Path) -> DomainCalibration | None:
    """The per-domain calibration metadata names (``domain_calibration.file``), or None when
    the artifact has a single temperature only. A named but unreadable file stops start-up:
    serving with the wrong calibration would show wrong probabilities."""
    spec = metadata.raw.get("domain_calibration")
    if spec is None:
        return None
    if not isinstance(spec, Mapping) or not spec.get("file"):
        raise ModelLoadError("metadata.json domain_calibration must name its file")
    path = model_dir / str(spec["file"])
    try:
        dc = DomainCalibration.load(path)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"cannot load domain calibration {path}: {exc}") from exc
    if dc.embedding_output not in metadata.endpoints["serve"]:
        raise ModelLoadError(
            f"domain_calibration needs the serve endpoint's {dc.embedding_output} output"
        )
    return dc


def load_domain_thresholds(
    metadata: ModelMetadata, dc: DomainCalibration | None
) -> tuple[float, float] | None:
    """(threshold of domains[0], of domains[1]) from ``domain_calibration.thresholds``, or
    None (one threshold for every photo). Each must lie strictly inside the two tiers that
    meet at metadata's threshold, so moving that boundary never empties or inverts a tier."""
    spec = metadata.raw.get("domain_calibration")
    raw = spec.get("thresholds") if isinstance(spec, Mapping) else None
    if raw is None or dc is None:
        return None
    if not isinstance(raw, Mapping) or set(raw) != set(dc.domains):
        raise ModelLoadError(f"domain_calibration.thresholds must name the domains {dc.domains}")
    tiers = metadata.risk_tiers
    below = [t.lower for t in tiers if math.isclose(t.upper, metadata.threshold, abs_tol=1e-12)]
    above = [t.upper for t in tiers if math.isclose(t.lower, metadata.threshold, abs_tol=1e-12)]
    lo, hi = (below[0] if below else 0.0), (above[0] if above else 1.0)
    values = []
    for name in dc.domains:
        value = raw[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ModelLoadError(f"domain_calibration.thresholds.{name} must be a number")
        if not lo < float(value) < hi:
            raise ModelLoadError(
                f"domain_calibration.thresholds.{name} = {value} is outside ({lo}, {hi}), "
                "the tiers around the threshold"
            )
        values.append(float(value))
    return values[0], values[1]
