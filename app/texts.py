"""Plain-language wording shared by the API and the pages.

The service never says "you have cancer" or "you are fine": it reports what the model saw
in one photo and what a sensible next step is.
"""

from __future__ import annotations

DISCLAIMER = (
    "This is not a diagnosis. It is an automated estimate from a single photo, made by a "
    "computer model that can be wrong in both directions. Only a doctor who examines your "
    "skin can tell what a spot is. If you are worried about any spot, or it bleeds, itches, "
    "or changes, see a doctor or dermatologist whatever this result says."
)

# ABCDE: the warning signs every result page repeats.
WARNING_SIGNS: tuple[tuple[str, str], ...] = (
    ("A — Asymmetry", "one half does not match the other"),
    ("B — Border", "ragged, notched or blurred edges"),
    ("C — Colour", "several shades of brown, black, red, white or blue"),
    ("D — Diameter", "larger than 6 mm (about a pencil eraser)"),
    ("E — Evolving", "changing in size, shape, colour or height"),
    ("Also", "a spot that bleeds, itches, crusts or does not heal"),
)

HEADLINES = {
    "positive": "Features of concern found: please have this spot checked by a doctor",
    "negative": "No strong features of concern were found in this photo",
    "unable_to_assess": "We could not assess this photo",
    "not_a_lesion": "This does not look like a close-up photo of a skin spot",
}

# Default next-step advice per tier position (see TriageModel.tier_position); an artifact can
# override it per tier with an `advice` field in risk_tiers.
TIER_ADVICE = {
    "above": (
        "Please make an appointment with a doctor or dermatologist soon, within the next few "
        "weeks, and show them this spot. Go sooner if it is bleeding, growing or changing."
    ),
    "between": (
        "Some features are borderline. Ask a doctor to look at it at your next opportunity, "
        "and keep an eye on it: photograph it in the same light every month and see a doctor "
        "sooner if it changes or shows any of the warning signs below."
    ),
    "lowest": (
        "Nothing in this photo stood out to the model, but that does not rule out skin cancer. "
        "Keep checking your skin and see a doctor if this spot changes, looks different from "
        "your other moles, bleeds or itches."
    ),
}

OOD_MESSAGE = (
    "The photo does not look like the close-up skin-spot photos the model was trained on, "
    "so its estimate would not be meaningful."
)
OOD_ADVICE = (
    "Photograph a single mole or spot from about 10 cm away so that it fills most of the "
    "frame, in focus and in good light. If you did and still see this, ask a doctor instead."
)

UNABLE_ADVICE_FALLBACK = "Please take a new photo and try again."
ODD_SHAPE_MESSAGE = "The photo is a long, thin strip, not a normal photo of a spot."
ODD_SHAPE_ADVICE = (
    "Send the whole photo from your camera, not a cropped strip, a panorama or a screenshot, "
    "with the spot in the middle."
)

# The heat-map switch, its picture's alt text and its caption, by what the map shows (see
# PredictionResult.heatmap_evidence and app.routers.pages.heatmap_view): "concern" for a
# positive answer, "looked" (evidence against) for a negative one, "raised" for a negative
# answer from an artifact without the evidence-against map, "none" when the map is empty.
NOT_A_DISEASE_MAP = "The colours are not a map of disease and do not show where a problem is."
HEATMAP_TEXTS: dict[str, dict[str, str]] = {
    "concern": {
        "toggle": "Show the areas that raised concern (heat map)",
        "alt": "Heat map over the photo: coloured areas raised the model's concern the most",
        "hint": "Coloured areas are the parts of the photo that raised the model's estimate "
        "the most (red the most, blue the least; no colour: little or no effect). "
        + NOT_A_DISEASE_MAP,
    },
    "looked": {
        "toggle": "Show where the model looked most (heat map)",
        "alt": "Heat map over the photo: coloured areas are where the model looked most",
        "hint": "Coloured areas are the parts of the photo the model relied on most for its "
        "lower estimate (red the most, blue the least). They do not mean those areas are "
        "healthy. " + NOT_A_DISEASE_MAP,
    },
    "raised": {
        "toggle": "Show the areas that raised the estimate (heat map)",
        "alt": "Heat map over the photo: coloured areas raised the model's estimate a little",
        "hint": "Coloured areas are the parts of the photo that raised the model's estimate "
        "a little, though not enough to flag the spot (red the most). " + NOT_A_DISEASE_MAP,
    },
    "none": {
        "toggle": "",
        "alt": "",
        "hint": "No area of the photo stood out to the model, so there is no heat map to show.",
    },
}

# The result card's line naming the kind of photo a model with one calibration per kind read
# the photo as (PredictionResult.photo_domain; model_training.data.DOMAINS names the kinds). A
# phone photo read as dermoscopy gets dermoscopy's threshold, so a user who sees the wrong kind
# knows the answer is less sure; two photos with different thresholds are explained too.
PHOTO_KINDS: dict[str, str] = {
    "dermoscopy": "a dermatoscope image (taken through a skin magnifier with its own light)",
    "phone": "an ordinary close-up photo (a phone or camera, no dermatoscope)",
}
PHOTO_KIND_HINT = (
    "The estimate and the level for a doctor's check are set for that kind of photo; if it "
    "is wrong, treat the result with extra caution."
)


def photo_kind(domain: str) -> str:
    """The result card's sentence for a photo read as ``domain`` (a name not in PHOTO_KINDS
    is quoted as it is)."""
    return f"Read as {PHOTO_KINDS.get(domain, f'a “{domain}” photo')}. {PHOTO_KIND_HINT}"


# Under the crop slider of the upload page (static/app.js): a spot photographed from further
# away than the model's close-ups loses much of its sensitivity, and cropping back restores
# most of it, while a crop much tighter than a close-up costs specificity
# (docs/quality/photo_changes.txt), hence the ring and the skin around the spot.
CROP_HINT = (
    "Photo taken from further away? Make the square smaller, then tap or drag it onto the "
    "spot so that the spot fills the circle with a little skin around it. Only the part in "
    "the square is checked."
)

PHOTO_TIPS: tuple[str, ...] = (
    "Hold the camera about 10 cm from the skin; tap the screen to focus. If it cannot focus "
    "that close, step back a little and zoom in on the spot on this page before checking.",
    "Use good, even daylight; avoid the flash (its glare hides detail).",
    "Send the photo in colour: no black-and-white or other filters.",
    "Put the spot in the centre and let it fill most of the frame.",
    "Keep hair, clothing and shadows off the spot.",
    "One spot per photo.",
)


def percent(p: float) -> str:
    """A probability as a short, honest percentage ("less than 1%" rather than "0%")."""
    if p < 0.01:
        return "less than 1%"
    if p > 0.99:
        return "more than 99%"
    return f"{round(p * 100)}%"


def bound_percent(p: float) -> str:
    """A tier or scale boundary as a percentage: exact ends, one decimal below 1% or above 99%."""
    if p <= 0.0:
        return "0%"
    if p >= 1.0:
        return "100%"
    if p < 0.01 or p > 0.99:
        return f"{p * 100:.1f}%"
    return f"{round(p * 100)}%"
