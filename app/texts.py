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

PHOTO_TIPS: tuple[str, ...] = (
    "Hold the camera about 10 cm from the skin; tap the screen to focus.",
    "Use good, even daylight; avoid the flash (its glare hides detail).",
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
