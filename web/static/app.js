// The morph page: a form for 2 to 8 images and their prompts, one POST /api/morph per morph,
// read back as server-sent events (progress, frames, then the result or the service's error).
// Limits, defaults and presets come from /api/limits (the service's own sources of truth).
"use strict";

const STAGES = ["lora", "inversion", "frames", "reschedule"];
const $ = (id) => document.getElementById(id);

function promptFromName(name, known) {
  // A prompt from a file name: the demo's own prompt when it is a demo image, else
  // "red_circle.png" -> "a red circle".
  if (known[name]) return known[name];
  const words = name.replace(/\.[^.]*$/, "").replace(/[_\-.]+/g, " ").replace(/\s+/g, " ").trim().toLowerCase();
  if (!words) return "";
  return (/^[aeiou]/.test(words) ? "an " : "a ") + words;
}

function formatBytes(n) {
  if (n >= 1024 * 1024) return (n / 1024 / 1024).toFixed(1) + " MiB";
  if (n >= 1024) return (n / 1024).toFixed(0) + " KiB";
  return n + " B";
}

function base64Blob(b64, mime) {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  return new Blob([bytes], { type: mime });
}

class MorphPage {
  constructor(limits) {
    this.limits = limits;
    this.items = []; // {file, prompt, url}, in morph order
    this.dragIndex = null;
    this.abort = null;
    this.urls = []; // object URLs of the last result, revoked on the next morph
    this.stageState = {};
    this.buildSettings();
    this.bindInputs();
    this.setState("idle");
  }

  setState(state) {
    document.body.dataset.state = state;
    const running = state === "running";
    $("morph").disabled = running;
    $("cancel").hidden = !running;
    $("file-input").disabled = running;
  }

  // ------------------------------------------------------------------ settings
  buildSettings() {
    const L = this.limits;
    $("drop-note").textContent = `${L.min_images} to ${L.max_images} images, at most ${formatBytes(L.max_request_bytes)} together`;
    const frames = $("frames");
    frames.min = L.min_frames; frames.max = L.max_frames; frames.value = L.default_frames;
    $("seed").value = L.default_seed;
    const preset = $("preset");
    for (const name of Object.keys(L.presets)) {
      const option = document.createElement("option");
      option.value = name;
      option.textContent = name === "fast" ? "fast (about 5x quicker)" : name === "default" ? "default (the paper's settings)" : name;
      option.selected = name === L.default_preset;
      preset.appendChild(option);
    }
    preset.addEventListener("change", () => this.updatePlaceholders());
    const grid = $("advanced-options");
    for (const spec of L.options) {
      const label = document.createElement("label");
      label.textContent = spec.name;
      let input;
      if (spec.kind === "bool" || spec.choices) {
        input = document.createElement("select");
        const values = spec.choices || ["true", "false"];
        input.appendChild(new Option("", ""));
        for (const value of values) input.appendChild(new Option(String(value), String(value)));
      } else {
        input = document.createElement("input");
        input.type = spec.kind === "str" ? "text" : "number";
        if (spec.kind === "int") input.step = "1";
        if (spec.kind === "float") input.step = "any";
      }
      input.id = "opt-" + spec.name;
      input.dataset.option = spec.name;
      input.dataset.kind = spec.kind;
      label.appendChild(input);
      grid.appendChild(label);
    }
    this.updatePlaceholders();
    this.buildWebpChoice();
  }

  buildWebpChoice() {
    // The WebP download: none, lossy at a quality (bounds and default from the service), or lossless.
    const Q = this.limits.webp_quality;
    const quality = $("webp-quality");
    quality.min = Q.min; quality.max = Q.max; quality.placeholder = String(Q.default);
    $("webp-mode").addEventListener("change", () => { quality.disabled = $("webp-mode").value !== "lossy"; });
  }

  webpOptions() {
    const mode = $("webp-mode").value;
    if (!mode) return {};
    if (mode === "lossless") return { format: ["webp"], webp_lossless: true };
    const raw = $("webp-quality").value.trim();
    return raw === "" ? { format: ["webp"] } : { format: ["webp"], webp_quality: Number(raw) };
  }

  updatePlaceholders() {
    // Show what an empty field means: the chosen preset's value, else the server's default.
    const preset = this.limits.presets[$("preset").value] || {};
    for (const spec of this.limits.options) {
      const input = $("opt-" + spec.name);
      const value = spec.name in preset ? preset[spec.name] : spec.default;
      const shown = value === null ? "auto" : String(value);
      if (input.tagName === "SELECT") input.options[0].textContent = `(${shown})`;
      else input.placeholder = shown;
    }
  }

  options() {
    const options = { preset: $("preset").value, num_frames: Number($("frames").value), seed: Number($("seed").value) };
    for (const input of document.querySelectorAll("[data-option]")) {
      const raw = input.value.trim();
      if (raw === "") continue;
      const kind = input.dataset.kind;
      options[input.dataset.option] = kind === "bool" ? raw === "true" : kind === "int" || kind === "float" ? Number(raw) : raw;
    }
    // The shared-LoRA switch: one LoRA fitted on all the images (MorphConfig.shared_lora).
    if ($("shared-lora").checked) options.shared_lora = true;
    return { ...options, ...this.webpOptions() };
  }

  // ------------------------------------------------------------------ images
  bindInputs() {
    const drop = $("drop");
    const input = $("file-input");
    input.addEventListener("change", () => { this.addFiles(input.files); input.value = ""; });
    drop.addEventListener("dragover", (e) => {
      if (![...e.dataTransfer.types].includes("Files")) return;
      e.preventDefault(); drop.classList.add("over");
    });
    drop.addEventListener("dragleave", () => drop.classList.remove("over"));
    drop.addEventListener("drop", (e) => {
      e.preventDefault(); drop.classList.remove("over");
      if (document.body.dataset.state !== "running") this.addFiles(e.dataTransfer.files);
    });
    $("morph").addEventListener("click", () => this.morph());
    $("cancel").addEventListener("click", () => { if (this.abort) this.abort.abort(); });
  }

  addFiles(files) {
    this.clearError();
    for (const file of files) {
      if (this.items.length >= this.limits.max_images) {
        this.showError("REFUSED", `a morph takes at most ${this.limits.max_images} images; ${file.name} was not added`);
        break;
      }
      this.items.push({ file, prompt: promptFromName(file.name, this.limits.known_prompts), url: URL.createObjectURL(file) });
    }
    this.renderImages();
  }

  move(from, to) {
    if (to < 0 || to >= this.items.length || from === to) return;
    const [item] = this.items.splice(from, 1);
    this.items.splice(to, 0, item);
    this.renderImages();
  }

  renderImages() {
    const list = $("images");
    list.replaceChildren();
    this.items.forEach((item, index) => {
      const li = document.createElement("li");
      li.draggable = true;
      li.dataset.index = index;
      li.innerHTML = `<span class="handle" title="drag to reorder">&#x2630;</span><img alt="">
        <div><input type="text" class="prompt" aria-label="prompt of image ${index + 1}"><div class="name"></div>
          <label class="lora-upload">LoRA (optional) <input type="file" class="lora" accept=".safetensors"></label> <span class="lora-name"></span></div>
        <div class="tools"><button type="button" class="up" title="earlier">&uarr;</button><button type="button" class="down" title="later">&darr;</button><button type="button" class="remove" title="remove">&times;</button></div>`;
      li.querySelector("img").src = item.url;
      li.querySelector(".name").textContent = `${index + 1}. ${item.file.name} (${formatBytes(item.file.size)})`;
      const prompt = li.querySelector("input.prompt");
      prompt.value = item.prompt;
      prompt.addEventListener("input", () => { item.prompt = prompt.value; });
      // A LoRA file sent for this image instead of fitting one (kept with the image when reordered).
      const lora = li.querySelector("input.lora");
      const loraName = li.querySelector(".lora-name");
      loraName.textContent = item.lora ? item.lora.name : "";
      lora.addEventListener("change", () => { item.lora = lora.files[0] || null; loraName.textContent = item.lora ? item.lora.name : ""; });
      li.querySelector(".up").addEventListener("click", () => this.move(index, index - 1));
      li.querySelector(".down").addEventListener("click", () => this.move(index, index + 1));
      li.querySelector(".remove").addEventListener("click", () => {
        URL.revokeObjectURL(item.url); this.items.splice(index, 1); this.renderImages();
      });
      li.addEventListener("dragstart", (e) => { this.dragIndex = index; li.classList.add("dragging"); e.dataTransfer.effectAllowed = "move"; });
      li.addEventListener("dragend", () => { this.dragIndex = null; li.classList.remove("dragging"); });
      li.addEventListener("dragover", (e) => { if (this.dragIndex !== null) { e.preventDefault(); li.classList.add("drop-before"); } });
      li.addEventListener("dragleave", () => li.classList.remove("drop-before"));
      li.addEventListener("drop", (e) => {
        if (this.dragIndex === null) return;
        e.preventDefault(); e.stopPropagation();
        this.move(this.dragIndex, index);
      });
      list.appendChild(li);
    });
    $("one-image").hidden = this.items.length !== 1;  // one image: the prompts to make the other ends from
    const total = this.items.reduce((sum, item) => sum + item.file.size, 0);
    $("upload-note").textContent = this.items.length
      ? `${this.items.length} image(s), ${formatBytes(total)} of at most ${formatBytes(this.limits.max_request_bytes)}`
      : "";
  }

  // ------------------------------------------------------------------ checks
  check() {
    const L = this.limits;
    const more = this.morePrompts().length;
    if (this.items.length === 1 && (more < L.min_one_image_prompts - 1 || more > L.max_one_image_prompts - 1))
      return `one image needs ${L.min_one_image_prompts - 1} to ${L.max_one_image_prompts - 1} prompt(s) to morph to, got ${more}`;
    if (this.items.length !== 1 && (this.items.length < L.min_images || this.items.length > L.max_images))
      return `a morph takes ${L.min_images} to ${L.max_images} images, got ${this.items.length}`;
    const total = this.items.reduce((sum, item) => sum + item.file.size, 0);
    if (total > L.max_request_bytes)
      return `the images are ${formatBytes(total)} together; this service takes at most ${formatBytes(L.max_request_bytes)} per morph`;
    const frames = Number($("frames").value);
    if (!Number.isInteger(frames) || frames < L.min_frames || frames > L.max_frames)
      return `frames must be a whole number from ${L.min_frames} to ${L.max_frames}`;
    const quality = $("webp-quality");
    const q = Number(quality.value);
    if (!quality.disabled && quality.value.trim() !== "" && (!Number.isInteger(q) || q < L.webp_quality.min || q > L.webp_quality.max))
      return `WebP quality must be a whole number from ${L.webp_quality.min} to ${L.webp_quality.max}`;
    return null;
  }

  morePrompts() {
    // One-image mode: the prompts of the endpoints the service makes, one per non-empty line.
    if (this.items.length !== 1) return [];
    return $("more-prompts").value.split("\n").map((line) => line.trim()).filter((line) => line);
  }

  showMadeEndpoints(endpoints) {
    const box = $("made-endpoints");
    box.replaceChildren();
    for (const endpoint of endpoints || []) {
      const img = document.createElement("img");
      img.src = "data:image/png;base64," + endpoint.png;
      img.alt = `made by the service: ${endpoint.name}`;
      img.dataset.name = endpoint.name;
      box.appendChild(img);
    }
    box.hidden = !box.children.length;
  }

  // ------------------------------------------------------------------ morph
  resetRun() {
    this.clearError();
    for (const url of this.urls) URL.revokeObjectURL(url);
    this.urls = [];
    this.stageState = {};
    for (const stage of STAGES) {
      $("progress-" + stage).max = 1; $("progress-" + stage).value = 0;
      $("label-" + stage).textContent = "waiting";
      $("stage-" + stage).classList.remove("done");
    }
    $("frames-strip").replaceChildren();
    $("result").hidden = true;
  }

  async morph() {
    const problem = this.check();
    if (problem) { this.showError("REFUSED", problem); return; }
    this.resetRun();
    const body = new FormData();
    this.items.forEach((item, index) => {
      body.append("image", item.file, item.file.name);
      body.append("prompt", item.prompt);
      if (item.lora) body.append("lora_" + index, item.lora, item.lora.name);
    });
    for (const prompt of this.morePrompts()) body.append("prompt", prompt);
    body.append("options", JSON.stringify(this.options()));
    this.abort = new AbortController();
    this.started = performance.now();
    this.setState("running");
    $("status").textContent = "sending...";
    let outcome = "error";
    try {
      const response = await fetch("/api/morph", { method: "POST", body, signal: this.abort.signal });
      if (!response.ok) {
        const text = await response.text();
        let answer;
        try { answer = JSON.parse(text); } catch { answer = { code: String(response.status), message: text }; }
        this.showError(answer.code, answer.message, answer.hint);
      } else {
        outcome = await this.readEvents(response);
      }
    } catch (error) {
      if (error.name === "AbortError") this.showError("CANCELLED", "you cancelled the morph");
      else this.showError("UNREACHABLE", "the web page's server did not answer: " + error.message);
    } finally {
      this.abort = null;
      this.setState(outcome);
      if (outcome !== "done") $("status").textContent = "";
    }
  }

  async readEvents(response) {
    // Server-sent events over a fetch body (EventSource cannot POST a form).
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        let event = "message"; let data = "";
        for (const line of block.split("\n")) {
          if (line.startsWith("event: ")) event = line.slice(7);
          else if (line.startsWith("data: ")) data += line.slice(6);
        }
        if (!data) continue;
        const outcome = this.onEvent(event, JSON.parse(data));
        if (outcome) return outcome;
      }
    }
    this.showError("UNAVAILABLE", "the stream ended without a result");
    return "error";
  }

  onEvent(event, data) {
    if (event === "accepted") $("status").textContent = "queued at the morph service...";
    else if (event === "progress") this.onProgress(data);
    else if (event === "frame") this.onFrame(data);
    else if (event === "result") { this.onResult(data); return "done"; }
    else if (event === "error") { this.showError(data.code, data.message, data.hint); return "error"; }
    return null;
  }

  onProgress(p) {
    if (!STAGES.includes(p.stage)) return;
    const state = (this.stageState[p.stage] ||= {});
    state[p.item ?? 0] = { step: p.step, total: p.total };
    const parts = Object.values(state);
    const step = parts.reduce((s, x) => s + x.step, 0);
    const total = parts.reduce((s, x) => s + x.total, 0);
    const bar = $("progress-" + p.stage);
    bar.max = total; bar.value = step;
    const unit = p.stage === "frames" || p.stage === "reschedule" ? "frames" : "steps";
    $("label-" + p.stage).textContent = `${p.step} / ${p.total} ${unit}` + (parts.length > 1 ? ` (${parts.length} images)` : "");
    $("stage-" + p.stage).classList.toggle("done", step >= total);
    $("status").textContent = `${p.stage}...`;
  }

  onFrame(f) {
    const strip = $("frames-strip");
    const img = document.createElement("img");
    img.src = "data:image/png;base64," + f.png;
    img.alt = `frame ${f.index + 1}`;
    img.dataset.index = f.index;
    const later = [...strip.children].find((child) => Number(child.dataset.index) > f.index);
    strip.insertBefore(img, later || null);
    $("status").textContent = `frame ${f.index + 1} of ${f.num_frames}`;
  }

  onResult({ metadata, media, loras, endpoints }) {
    this.showMadeEndpoints(endpoints);
    for (const stage of STAGES) {
      if (!this.stageState[stage]) $("label-" + stage).textContent = this.skippedLabel(stage, metadata);
    }
    const show = (key, element, link) => {
      const part = media[key];
      if (!part) { $(link).hidden = true; return; }
      const url = URL.createObjectURL(base64Blob(part.data, part.mime));
      this.urls.push(url);
      if (element) $(element).src = url;
      $(link).href = url; $(link).hidden = false;
      $(link).textContent = `${$(link).textContent.replace(/ \(.*\)$/, "")} (${formatBytes(part.size)})`;
    };
    show("gif", "result-gif", "download-gif");
    show("mp4", "result-mp4", "download-mp4");
    show("zip", null, "download-zip");
    show("webp", null, "download-webp");
    this.showLoras(loras || []);
    this.renderMetadata(metadata);
    $("metadata-json").textContent = JSON.stringify(metadata, null, 2);
    $("result").hidden = false;
    const seconds = ((performance.now() - this.started) / 1000).toFixed(1);
    $("status").textContent = `done: ${metadata.num_frames} frames in ${seconds} s`;
  }

  showLoras(loras) {
    // One download per image's LoRA (return_loras): diffusers LoRA files.
    const box = $("download-loras");
    box.replaceChildren();
    for (const part of loras) {
      const url = URL.createObjectURL(base64Blob(part.data, part.mime));
      this.urls.push(url);
      const link = document.createElement("a");
      link.className = "button"; link.href = url; link.download = part.name; link.id = "download-" + part.name.replace(/\.safetensors$/, "");
      link.textContent = `Download ${part.name} (${formatBytes(part.size)})`;
      box.appendChild(link);
    }
    box.hidden = loras.length === 0;
  }

  skippedLabel(stage, metadata) {
    const cache = metadata.cache || [];
    if (stage === "lora" && cache.length && cache.every((c) => c.lora === "hit")) return "cached";
    if (stage === "inversion" && cache.length && cache.every((c) => c.latent === "hit")) return "cached";
    if (stage === "reschedule" && metadata.schedule_cache === "hit") return "cached";
    return "not run";
  }

  renderMetadata(m) {
    const round = (x) => (typeof x === "number" ? Number(x.toFixed(3)) : x);
    const timings = Object.entries(m.timings || {}).map(([k, v]) => `${k} ${round(v)} s`).join(", ");
    // One list of alphas per segment (several images) or one list (two images).
    const segments = Array.isArray((m.alphas || [])[0]) ? m.alphas : [m.alphas || []];
    const alphas = segments.map((row) => row.map(round).join(" ")).join(" | ");
    const cache = (m.cache || []).map((c, i) => `image ${i + 1}: LoRA ${c.lora}, latent ${c.latent}`).join("; ")
      + (m.schedule_cache ? `; schedule ${m.schedule_cache}` : "");
    const rows = [
      ["frames", m.num_frames], ["seed", m.seed], ["resolution", m.resolution],
      ["metric", m.perceptual_metric], ["alphas", alphas], ["timings", timings], ["cache", cache],
    ];
    const body = $("metadata").tBodies[0];
    body.replaceChildren();
    for (const [name, value] of rows) {
      const tr = body.insertRow();
      const th = document.createElement("th"); th.textContent = name; tr.appendChild(th);
      tr.insertCell().textContent = value === undefined || value === null ? "" : String(value);
      tr.dataset.field = name;
    }
  }

  // ------------------------------------------------------------------ errors
  showError(code, message, hint) {
    const box = $("error");
    box.replaceChildren();
    const codeSpan = document.createElement("span"); codeSpan.className = "code"; codeSpan.textContent = code || "ERROR";
    const text = document.createElement("span"); text.className = "message"; text.textContent = message || "";
    box.append(codeSpan, text);
    if (hint) { const h = document.createElement("span"); h.className = "hint"; h.textContent = hint; box.appendChild(h); }
    box.hidden = false;
  }

  clearError() { $("error").hidden = true; $("error").replaceChildren(); }
}

async function start() {
  try {
    const response = await fetch("/api/limits");
    window.morphPage = new MorphPage(await response.json());
  } catch (error) {
    document.body.dataset.state = "broken";
    $("error").hidden = false;
    $("error").textContent = "the page could not load its settings: " + error.message;
  }
}

start();
