/* Progressive enhancement of the upload form: preview, drag and drop, and an in-page result
 * fetched from /predict. Without this script the form posts to /assess and the server renders
 * the same result page. Server text is inserted as text nodes only, never parsed as markup. */
(function () {
  "use strict";

  var form = document.getElementById("upload-form");
  if (!form || !window.fetch || !window.FormData) {
    return; // old browser: the plain form keeps working
  }
  document.documentElement.classList.add("has-js");

  var cameraInput = document.getElementById("camera-input");
  var fileInput = document.getElementById("file-input");
  var dropzone = document.getElementById("dropzone");
  var preview = document.getElementById("preview");
  var previewImg = document.getElementById("preview-img");
  var previewName = document.getElementById("preview-name");
  var previewNote = document.getElementById("preview-note");
  var submitButton = document.getElementById("submit-button");
  var working = document.getElementById("working");
  var resultRegion = document.getElementById("result");
  var maxBytes = parseInt(form.getAttribute("data-max-bytes") || "0", 10);
  var model = readJson("model-meta");
  var texts = readJson("page-texts") || {};

  var cropStage = document.getElementById("crop-stage");
  var cropFrame = document.getElementById("crop-frame");
  var cropControls = document.getElementById("crop-controls");
  var cropSize = document.getElementById("crop-size");
  var cropZoom = document.getElementById("crop-zoom");

  var selected = null; // the File to send
  var objectUrl = null; // its local preview URL
  var browserCanShow = true; // false for e.g. HEIC in most browsers: ask the server for a preview

  function readJson(id) {
    var node = document.getElementById(id);
    try {
      return node ? JSON.parse(node.textContent || "null") : null;
    } catch (e) {
      return null;
    }
  }

  function el(tag, attrs, children) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (key) {
      node.setAttribute(key, attrs[key]);
    });
    (children || []).forEach(function (child) {
      if (child === null || child === undefined) return;
      node.appendChild(typeof child === "string" ? document.createTextNode(child) : child);
    });
    return node;
  }

  function svg(tag, attrs) {
    var node = document.createElementNS("http://www.w3.org/2000/svg", tag);
    Object.keys(attrs).forEach(function (key) {
      node.setAttribute(key, String(attrs[key]));
    });
    return node;
  }

  function percent(p) {
    if (p < 0.01) return "less than 1%";
    if (p > 0.99) return "more than 99%";
    return Math.round(p * 100) + "%";
  }

  // A tier or scale boundary, as app.texts.bound_percent writes it.
  function bound(p) {
    if (p <= 0) return "0%";
    if (p >= 1) return "100%";
    if (p < 0.01 || p > 0.99) return (p * 100).toFixed(1) + "%";
    return Math.round(p * 100) + "%";
  }

  function formatBytes(n) {
    return n >= 1048576 ? (n / 1048576).toFixed(1) + " MB" : Math.max(1, Math.round(n / 1024)) + " KB";
  }

  function setWorking(message, busy) {
    working.textContent = message || "";
    working.classList.toggle("busy", !!busy);
    submitButton.disabled = !!busy;
    resultRegion.setAttribute("aria-busy", busy ? "true" : "false");
  }

  function clearResult() {
    while (resultRegion.firstChild) resultRegion.removeChild(resultRegion.firstChild);
  }

  // The crop square: its centre in fractions of the shown photo (upright, as the server sees
  // it) and its side in fractions of the photo's shorter side; 1 = the whole photo, uncropped.
  var crop = { cx: 0.5, cy: 0.5, side: 1 };

  function cropActive() {
    return !cropControls.hidden && crop.side < 1;
  }

  // The square in pixels of a w x h view of the photo (the shown one by default), its centre
  // kept so the square stays inside.
  function cropPixels(w, h) {
    w = w || previewImg.clientWidth;
    h = h || previewImg.clientHeight;
    var s = crop.side * Math.min(w, h);
    var left = Math.min(Math.max(crop.cx * w - s / 2, 0), w - s);
    var top = Math.min(Math.max(crop.cy * h - s / 2, 0), h - s);
    return { left: left, top: top, size: s, w: w, h: h };
  }

  function drawCrop() {
    cropFrame.hidden = !cropActive();
    cropStage.classList.toggle("cropping", cropActive());
    cropZoom.textContent = crop.side < 1 ? (1 / crop.side).toFixed(1) + "x" : "whole photo";
    if (!cropActive()) return;
    var px = cropPixels();
    // Stored back clamped, so the arrow keys move what is seen. CSSOM, not a style attribute:
    // the page's Content-Security-Policy allows no inline styles.
    crop.cx = (px.left + px.size / 2) / px.w;
    crop.cy = (px.top + px.size / 2) / px.h;
    cropFrame.style.left = px.left + "px";
    cropFrame.style.top = px.top + "px";
    cropFrame.style.width = px.size + "px";
    cropFrame.style.height = px.size + "px";
  }

  // left,top,width,height in fractions of the photo, as POST /predict's `crop` reads them:
  // measured on its own (upright) pixels, since the shown size is rounded to whole pixels.
  function cropField() {
    var px = cropPixels(previewImg.naturalWidth, previewImg.naturalHeight);
    return [px.left / px.w, px.top / px.h, px.size / px.w, px.size / px.h]
      .map(function (v) {
        return Math.min(1, Math.max(0, v)).toFixed(5);
      })
      .join(",");
  }

  function resetCrop(show) {
    crop = { cx: 0.5, cy: 0.5, side: 1 };
    cropSize.value = cropSize.max;
    cropControls.hidden = !show;
    drawCrop();
  }

  function moveCropTo(event) {
    var box = previewImg.getBoundingClientRect();
    crop.cx = (event.clientX - box.left) / box.width;
    crop.cy = (event.clientY - box.top) / box.height;
    drawCrop();
  }

  cropSize.addEventListener("input", function () {
    crop.side = Number(cropSize.value) / 100;
    drawCrop();
  });
  // A tap puts the square's centre there; dragging moves it (pointer events: mouse and touch).
  cropStage.addEventListener("pointerdown", function (event) {
    if (!cropActive()) return;
    event.preventDefault();
    cropStage.setPointerCapture(event.pointerId);
    moveCropTo(event);
  });
  cropStage.addEventListener("pointermove", function (event) {
    if (cropActive() && cropStage.hasPointerCapture(event.pointerId)) moveCropTo(event);
  });
  cropFrame.addEventListener("keydown", function (event) {
    var step = event.shiftKey ? 0.1 : 0.02;
    var moves = { ArrowLeft: [-step, 0], ArrowRight: [step, 0], ArrowUp: [0, -step], ArrowDown: [0, step] };
    var move = moves[event.key];
    if (!move) return;
    event.preventDefault();
    crop.cx += move[0];
    crop.cy += move[1];
    drawCrop();
  });
  window.addEventListener("resize", drawCrop);
  previewImg.addEventListener("load", function () {
    resetCrop(true); // only a photo the browser can show can be cropped here
  });

  function choose(file) {
    if (!file) return;
    selected = file;
    clearResult();
    setWorking("", false);
    if (objectUrl) URL.revokeObjectURL(objectUrl);
    objectUrl = URL.createObjectURL(file);
    browserCanShow = true;
    resetCrop(false);
    previewImg.hidden = false;
    previewImg.onerror = function () {
      // Not decodable here: hide the image (no broken-image icon). HEIC is a photo most
      // browsers cannot show, and the server sends back a JPEG preview; anything else is
      // probably not a photo at all, and the server will say so.
      browserCanShow = false;
      previewImg.hidden = true;
      previewImg.removeAttribute("src");
      previewNote.textContent = /\.(heic|heif)$/i.test(file.name || "") || /hei[cf]/i.test(file.type || "")
        ? "This photo can't be previewed here, but it can still be checked."
        : "This file can't be previewed; it may not be a photo.";
    };
    previewImg.src = objectUrl;
    previewName.textContent = (file.name || "photo") + " (" + formatBytes(file.size) + ")";
    previewNote.textContent = "";
    preview.hidden = false;
  }

  [cameraInput, fileInput].forEach(function (input) {
    if (!input) return;
    input.addEventListener("change", function () {
      if (input.files && input.files[0]) {
        choose(input.files[0]);
        var other = input === cameraInput ? fileInput : cameraInput;
        if (other) other.value = ""; // one photo at a time
      }
    });
  });

  // Drag and drop onto the whole zone.
  ["dragenter", "dragover"].forEach(function (type) {
    dropzone.addEventListener(type, function (event) {
      event.preventDefault();
      dropzone.classList.add("dragover");
    });
  });
  ["dragleave", "dragend", "drop"].forEach(function (type) {
    dropzone.addEventListener(type, function () {
      dropzone.classList.remove("dragover");
    });
  });
  dropzone.addEventListener("drop", function (event) {
    event.preventDefault();
    var files = event.dataTransfer && event.dataTransfer.files;
    if (!files || !files.length) return;
    try {
      fileInput.files = files; // keeps the form's own state in step where supported
    } catch (e) {
      /* read-only in old browsers: `selected` is what is sent anyway */
    }
    if (cameraInput) cameraInput.value = "";
    choose(files[0]);
  });

  function showError(message) {
    clearResult();
    var box = el("div", { class: "error-box", role: "alert" }, [
      el("h2", { tabindex: "-1" }, ["We could not check this photo"]),
      el("p", {}, [message]),
    ]);
    resultRegion.appendChild(box);
    box.querySelector("h2").focus();
  }

  function errorMessage(status, detail) {
    if (status === 413) return "The photo is too large. Please send one under " + formatBytes(maxBytes) + ".";
    if (status === 415) return "That file could not be read as a photo. Please choose a JPEG, PNG, WebP or HEIC image.";
    if (status === 422) return "Please choose or take a photo first.";
    if (status === 503) return "The service is still starting. Please try again in a minute.";
    return typeof detail === "string" ? detail : "Something went wrong (error " + status + "). Please try again.";
  }

  form.addEventListener("submit", function (event) {
    event.preventDefault();
    if (!selected) {
      showError("Please choose or take a photo first.");
      return;
    }
    if (maxBytes && selected.size > maxBytes) {
      showError(errorMessage(413));
      return;
    }
    clearResult();
    setWorking("Checking the photo… this can take a few seconds.", true);
    var body = new FormData();
    body.append("file", selected, selected.name || "photo");
    var cropped = cropActive();
    if (cropped) body.append("crop", cropField());
    // The result shows the photo as analysed: the server's preview when it was cropped (the
    // heat map covers the crop) or when this browser cannot show the file.
    var url = "/predict?explain=true" + (browserCanShow && !cropped ? "" : "&preview=true");
    fetch(url, { method: "POST", body: body, headers: { Accept: "application/json" } })
      .then(function (response) {
        return response
          .json()
          .catch(function () {
            return {};
          })
          .then(function (data) {
            return { status: response.status, ok: response.ok, data: data };
          });
      })
      .then(function (answer) {
        setWorking("", false);
        if (!answer.ok) {
          showError(errorMessage(answer.status, answer.data && answer.data.detail));
          return;
        }
        renderResult(answer.data);
      })
      .catch(function () {
        setWorking("", false);
        showError("Could not reach the service. Check your connection and try again.");
      });
  });

  function modelTier(tier) {
    if (!model || !tier) return null;
    for (var i = 0; i < model.tiers.length; i++) {
      if (model.tiers[i].name === tier.name) return model.tiers[i];
    }
    return null;
  }

  // Where the estimate p sits on the bar, 0..1, as app.routers.pages.bar_position computes
  // it: each risk tier gets an equal-width segment and p is placed linearly inside its tier,
  // clear of the segment's edges, so a small tier (e.g. 0–5%) stays readable on a phone and
  // the marker never sits on the threshold; tick labels give the real percentages.
  // The model's tiers with the decision threshold at the result's own (one per inferred photo
  // domain in some artifacts), as app.model.TriageModel.tiers_for moves it.
  function tiersFor(r) {
    var tiers = model ? model.tiers : [];
    if (!model || typeof r.threshold !== "number" || r.threshold === model.threshold) return tiers;
    return tiers.map(function (t) {
      var c = Object.assign({}, t);
      if (Math.abs(t.lower - model.threshold) < 1e-12) {
        c.lower = r.threshold;
        c.lower_label = bound(r.threshold);
      }
      if (Math.abs(t.upper - model.threshold) < 1e-12) {
        c.upper = r.threshold;
        c.upper_label = bound(r.threshold);
      }
      return c;
    });
  }

  function barPosition(p, tiers) {
    var n = tiers.length;
    var inset = model ? model.bar_inset || 0 : 0;
    p = Math.min(Math.max(p, 0), 1);
    if (!n) return p;
    for (var i = 0; i < n; i++) {
      var t = tiers[i];
      if (p < t.upper || i === n - 1) {
        var inside = Math.min(Math.max((p - t.lower) / (t.upper - t.lower), 0), 1);
        return (i + inset + inside * (1 - 2 * inset)) / n;
      }
    }
    return 1;
  }

  function probabilityBar(r) {
    var p = r.probability_malignant;
    var tiers = tiersFor(r);
    var range = bound(r.risk_tier.lower) + "–" + bound(r.risk_tier.upper);
    // Coordinates in percent of the width (no viewBox: the value label is not stretched).
    var bar = svg("svg", {
      class: "prob-bar",
      role: "img",
      "aria-label":
        "Estimate " + percent(p) + ", in the " + r.risk_tier.name + " risk level (" + range + "). Spots from " +
        percent(r.threshold) + " are flagged for a doctor's check. Each risk level takes an equal share of the bar.",
    });
    tiers.forEach(function (t) {
      bar.appendChild(svg("rect", { class: "band level-" + t.level, x: t.x, y: 22, width: t.width, height: 30 }));
    });
    bar.appendChild(svg("rect", { class: "frame", x: 0, y: 22, width: "100%", height: 30 }));
    var position = barPosition(p, tiers);
    var x = (position * 100).toFixed(3) + "%";
    bar.appendChild(svg("rect", { class: "fill", x: 0, y: 33, width: x, height: 8 }));
    var t = model && model.threshold_x ? model.threshold_x : (barPosition(r.threshold, tiers) * 100).toFixed(3) + "%";
    bar.appendChild(svg("line", { class: "threshold", x1: t, x2: t, y1: 18, y2: 56 }));
    ["needle-halo", "needle"].forEach(function (cls) {
      bar.appendChild(svg("line", { class: cls, x1: x, x2: x, y1: 17, y2: 55 }));
    });
    var label = svg("text", {
      class: "needle-label",
      x: x,
      y: 13,
      "text-anchor": position < 0.1 ? "start" : position > 0.9 ? "end" : "middle",
    });
    label.textContent = percent(p);
    bar.appendChild(label);

    var scale = el("div", { class: "prob-scale", "aria-hidden": "true" });
    tiers.forEach(function (tier, i) {
      scale.appendChild(
        el("span", { class: "seg" }, [
          el("span", { class: "tick" }, [tier.lower_label]),
          el("span", { class: "seg-name" }, [tier.name]),
          i === tiers.length - 1 ? el("span", { class: "tick tick-end" }, [tier.upper_label]) : null,
        ])
      );
    });
    var legend = el("ul", { class: "tier-legend", "aria-label": "Risk levels" });
    tiers.forEach(function (tier) {
      legend.appendChild(
        el("li", {}, [
          el("span", { class: "swatch level-" + tier.level, "aria-hidden": "true" }),
          tier.name + ": " + tier.lower_label + "–" + tier.upper_label,
        ])
      );
    });
    return el("figure", { class: "prob" }, [
      bar,
      scale,
      el("figcaption", {}, [
        el("ul", { class: "prob-keys" }, [
          el("li", {}, [el("span", { class: "key key-fill", "aria-hidden": "true" }), "this photo: " + percent(p)]),
          el("li", {}, [
            el("span", { class: "key key-threshold", "aria-hidden": "true" }),
            "doctor's check from " + percent(r.threshold),
          ]),
        ]),
        legend,
      ]),
    ]);
  }

  // Which heat-map wording fits (as app.routers.pages.heatmap_key): evidence of concern for a
  // positive label, where the model looked for a negative one, nothing when the map is empty.
  function heatmapKey(r) {
    if (!r.heatmap_png_base64) return null;
    if (r.heatmap_evidence === "none") return "none";
    if (r.heatmap_evidence === "against") return "looked";
    var positive = model ? model.positive_label : "malignant";
    return r.label === positive ? "concern" : "raised";
  }

  function photoBlock(r) {
    var src = r.preview_jpeg_base64 ? "data:image/jpeg;base64," + r.preview_jpeg_base64 : browserCanShow ? objectUrl : null;
    if (!src) return null;
    var stack = el("div", { class: "photo-stack" }, [
      el("img", { class: "photo", src: src, alt: "Your photo, as it was analysed" }),
    ]);
    var key = heatmapKey(r);
    var words = key && texts.heatmap ? texts.heatmap[key] : null;
    var children = [];
    var hintId = "heat-hint-" + r.request_id;
    if (key && key !== "none" && words) {
      var id = "heat-toggle-" + r.request_id;
      children.push(el("input", { type: "checkbox", id: id, class: "heat-toggle", "aria-describedby": hintId }));
      children.push(el("label", { for: id, class: "heat-toggle-label" }, [words.toggle]));
      stack.appendChild(
        el("img", { class: "heat", src: "data:image/png;base64," + r.heatmap_png_base64, alt: words.alt })
      );
    }
    children.push(stack);
    if (key && key !== "none" && words) {
      children.push(
        el("p", { class: "heat-key", "aria-hidden": "true" }, [
          el("span", {}, ["less"]),
          el("span", { class: "heat-ramp" }),
          el("span", {}, ["more"]),
        ])
      );
    }
    if (words) children.push(el("p", { class: "hint heat-hint", id: hintId }, [words.hint]));
    return el("div", { class: "photo-block" }, children);
  }

  function disclaimer(r) {
    var list = el("ul", { class: "abcde" });
    (texts.warning_signs || []).forEach(function (pair) {
      list.appendChild(el("li", {}, [el("strong", {}, [pair[0]]), ": " + pair[1]]));
    });
    return el("aside", { class: "disclaimer", "aria-label": "Please read" }, [
      el("h3", {}, ["Please read"]),
      el("p", {}, [r.disclaimer || texts.disclaimer || ""]),
      el("p", {}, ["See a doctor about any spot with these warning signs, whatever the result:"]),
      list,
    ]);
  }

  function renderResult(r) {
    clearResult();
    var classes = "result-card status-" + r.status;
    var tier = modelTier(r.risk_tier);
    if (tier) classes += " tier-" + tier.position + " tier-level-" + tier.level;
    var heading = el("h2", { id: "result-headline", tabindex: "-1" }, [r.headline]);
    var children = [heading];
    if (r.status === "ok") {
      var positive = model ? model.positive_label : "malignant";
      children.push(
        el("p", { class: "prob-text" }, [
          "The model estimates a ",
          el("strong", {}, [percent(r.probability_malignant)]),
          " chance that this spot is " + positive + ". Spots at " + percent(r.threshold) +
            " or above are flagged for a doctor's check.",
        ])
      );
      var kind = r.photo_domain && model && model.photo_kinds ? model.photo_kinds[r.photo_domain] : null;
      if (kind) {
        children.push(el("p", { class: "hint photo-kind", "data-photo-domain": r.photo_domain }, [kind]));
      }
      children.push(probabilityBar(r));
      children.push(
        el("section", { class: "next-step", "aria-labelledby": "next-step-heading" }, [
          el("h3", { id: "next-step-heading" }, ["What to do next"]),
          el("p", { class: "tier-name" }, ["Risk level: ", el("strong", {}, [r.risk_tier.name])]),
          el("p", {}, [r.risk_tier.advice]),
        ])
      );
      if (r.notes && r.notes.length) {
        var noteList = el("ul", {});
        r.notes.forEach(function (note) {
          noteList.appendChild(
            el("li", { "data-note": note.code }, [el("strong", {}, [note.message]), " " + note.advice])
          );
        });
        children.push(
          el("section", { class: "notes", "aria-labelledby": "notes-heading" }, [
            el("h3", { id: "notes-heading" }, ["Something in the photo can affect this estimate"]),
            noteList,
          ])
        );
      }
    } else {
      var reasons = el("ul", { class: "reasons" });
      (r.reasons || []).forEach(function (reason) {
        reasons.appendChild(el("li", {}, [el("strong", {}, [reason.message]), " " + reason.advice]));
      });
      children.push(reasons);
    }
    children.push(photoBlock(r));
    children.push(
      el("p", { class: "meta" }, ["Model " + r.model_name + " " + r.model_version + " · reference " + r.request_id])
    );
    children.push(disclaimer(r));
    resultRegion.appendChild(el("article", { class: classes, "aria-labelledby": "result-headline" }, children));
    heading.focus();
  }
})();
