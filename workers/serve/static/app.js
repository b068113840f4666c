/* lookalike: the page behind `lookalike serve`. Plain JS, no build step, no network beyond this server.
 *
 * Every string that comes from the server (file names, labels, tags, error messages) reaches the page through
 * textContent or DOM properties, never innerHTML. */
"use strict";

(() => {
  const KEY_STORE = "lookalike.apiKey";
  const THUMB = 256;
  const $ = (id) => document.getElementById(id);

  const state = {
    info: null, // GET /v1/collections
    file: null, // the image dropped, pasted or picked last (the one "Add to the index" sends)
    fileUrl: null,
    last: null, // {query, request}: rerun when k or the label filter change
    lastOptions: "",
    seq: 0, // answers of superseded searches are dropped
  };

  class ApiError extends Error {
    constructor(message, status = 0) {
      super(message);
      this.status = status;
    }
  }

  // ------------------------------------------------------------------------------------------ DOM helpers
  function el(tag, props = {}, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(props)) {
      if (value === undefined || value === null) continue;
      if (name === "className" || name === "textContent" || name === "title" || name === "type") node[name] = value;
      else if (name === "dataset") Object.assign(node.dataset, value);
      else node.setAttribute(name, value);
    }
    for (const child of children) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  function fileName(uri) {
    if (typeof uri !== "string" || !uri) return "(no file)";
    let path = uri;
    if (/^https?:\/\//i.test(uri)) {
      try { path = new URL(uri).pathname; } catch { /* keep the raw text */ }
    }
    const name = path.split(/[\\/]/).filter(Boolean).pop();
    try { return decodeURIComponent(name || uri); } catch { return name || uri; }
  }

  const plural = (n, one, many) => `${n.toLocaleString()} ${n === 1 ? one : many}`;
  const score = (value) => (typeof value === "number" && Number.isFinite(value) ? value.toFixed(3) : "–");
  const ms = (value) => `${Math.round(value).toLocaleString()} ms`;

  function setNote(node, text, kind = "") {
    node.textContent = text;
    node.className = kind ? `note ${kind}` : "note";
  }

  // ------------------------------------------------------------------------------------------ the API
  function authHeaders() {
    const key = sessionStorage.getItem(KEY_STORE);
    return key ? { Authorization: `Bearer ${key}` } : {};
  }

  async function api(path, { method = "GET", json, form, params, purpose = "for that" } = {}) {
    const url = new URL(path, window.location.origin);
    for (const [name, value] of Object.entries(params || {})) {
      for (const item of [].concat(value)) if (item !== undefined && item !== null) url.searchParams.append(name, item);
    }
    for (let attempt = 0; ; attempt += 1) {
      const started = performance.now();
      const hadKey = Boolean(sessionStorage.getItem(KEY_STORE));
      const headers = authHeaders();
      let body;
      if (json !== undefined) {
        headers["Content-Type"] = "application/json";
        body = JSON.stringify(json);
      } else if (form) {
        body = form;
      }
      let response;
      try {
        response = await fetch(url, { method, headers, body });
      } catch {
        throw new ApiError("Cannot reach the server. Is `lookalike serve` still running?");
      }
      let data = null;
      if ((response.headers.get("content-type") || "").includes("json")) {
        try { data = await response.json(); } catch { data = null; }
      }
      if (response.status === 401 && attempt < 3) {
        await askForKey(hadKey, purpose);
        continue;
      }
      if (!response.ok) throw new ApiError(describeError(response, data), response.status);
      // started: when the request that answered went out (after any wait for a key, which is not the server's)
      return { data, status: response.status, started: attempt ? started : null };
    }
  }

  function describeError(response, data) {
    if (data && typeof data.error === "string" && data.error) return data.error;
    if (response.status === 413) return "The image is larger than this server accepts.";
    if (response.status === 401) return "This server needs an API key.";
    return `The server answered ${response.status}${response.statusText ? ` ${response.statusText}` : ""}.`;
  }

  // ------------------------------------------------------------------------------------------ the API key
  let keyWaiters = [];

  function askForKey(hadKey, purpose) {
    const dialog = $("key-dialog");
    $("key-reason").textContent = hadKey
      ? "The server refused this API key. Enter the one it was started with (LOOKALIKE_API_KEY)."
      : `This server needs an API key ${purpose} (LOOKALIKE_API_KEY).`;
    $("key").value = "";
    if (!dialog.open) dialog.showModal();
    $("key").focus();
    return new Promise((resolve, reject) => keyWaiters.push({ resolve, reject }));
  }

  function settleKey(key) {
    const waiters = keyWaiters;
    keyWaiters = [];
    if (key) {
      sessionStorage.setItem(KEY_STORE, key);
      $("forget-key").hidden = false;
      waiters.forEach((w) => w.resolve());
    } else {
      waiters.forEach((w) => w.reject(new ApiError("This needs an API key; none was given.", 401)));
    }
  }

  function initKey() {
    const dialog = $("key-dialog");
    $("key-form").addEventListener("submit", (event) => {
      const key = $("key").value.trim();
      if (!key) {
        event.preventDefault();
        $("key").focus();
        return;
      }
      settleKey(key);
    });
    $("key-cancel").addEventListener("click", () => dialog.close());
    dialog.addEventListener("close", () => { if (keyWaiters.length) settleKey(null); });
    $("forget-key").hidden = !sessionStorage.getItem(KEY_STORE);
    $("forget-key").addEventListener("click", () => {
      sessionStorage.removeItem(KEY_STORE);
      $("forget-key").hidden = true;
    });
  }

  // ------------------------------------------------------------------------------------------ the server line
  async function loadInfo() {
    try {
      const { data } = await api("/v1/collections", { purpose: "to read the index" });
      state.info = data;
      renderInfo(data);
    } catch (error) {
      const server = $("server");
      server.textContent = error.message;
      server.className = "server error";
      if (error.status === 0 || error.status === 503) window.setTimeout(loadInfo, 3000);
    }
  }

  function renderInfo(info) {
    const server = $("server");
    server.className = "server";
    server.replaceChildren(
      el("span", { className: "pill", title: `${info.preprocessing}, ${info.dim}-d vectors` },
        "model ", el("strong", { textContent: info.model })),
      el("span", { className: "pill", id: "points", dataset: { points: String(info.points) } },
        plural(info.points, "image", "images")),
      el("span", { className: "pill", title: `collection ${info.collection}` }, `${info.store} store`),
      el("span", { className: "pill" }, `uploads ${info.uploads}`),
    );
    enable("url", info.fetch_urls, "The server downloads the image at this address and searches with it.",
      "URL fetching is off on this server (LOOKALIKE_FETCH_URLS).");
    enable("text", info.supports_text, "Search the images by a description (CLIP).",
      `Text search is off: the model ${info.model} embeds images only; text search needs a CLIP model such as ` +
      "clip-ViT-B-32.");
  }

  function enable(name, on, hint, reason) {
    const input = $(name);
    const form = $(`${name}-form`);
    input.disabled = !on;
    form.querySelector("button").disabled = !on;
    form.classList.toggle("off", !on);
    setNote($(`${name}-note`), on ? hint : reason, on ? "" : "reason");
  }

  // ------------------------------------------------------------------------------------------ results
  function thumbnail(id, alt) {
    const box = el("span", { className: "thumb" });
    const img = new Image(THUMB, THUMB);
    img.loading = "lazy";
    img.decoding = "async";
    img.alt = alt;
    img.addEventListener("error", () => thumbnailFailed(box, img, id), { once: true });
    img.src = `/v1/points/${encodeURIComponent(id)}/thumbnail?size=${THUMB}`;
    box.append(img);
    return box;
  }

  async function thumbnailFailed(box, img, id) {
    // Reads may need the key (LOOKALIKE_PROTECT_READS); an <img> cannot send it, fetch can.
    if (sessionStorage.getItem(KEY_STORE) && !img.src.startsWith("blob:")) {
      try {
        const response = await fetch(`/v1/points/${encodeURIComponent(id)}/thumbnail?size=${THUMB}`,
          { headers: authHeaders() });
        if (response.ok) {
          const url = URL.createObjectURL(await response.blob());
          img.addEventListener("load", () => URL.revokeObjectURL(url), { once: true });
          img.addEventListener("error", () => thumbnailFailed(box, img, id), { once: true });
          img.src = url;
          return;
        }
      } catch { /* fall through to the placeholder */ }
    }
    img.remove();
    box.classList.add("missing");
    box.append(el("span", { className: "missing-text", title: "The stored file cannot be read (moved or changed)" },
      "No preview"));
  }

  function chips(hit) {
    const list = el("span", { className: "chips" });
    for (const label of hit.labels || []) {
      list.append(el("span", { className: "chip label", title: "label" }, String(label)));
    }
    for (const tag of hit.tags || []) {
      if (!tag || typeof tag.label !== "string") continue;
      list.append(el("span", { className: "chip tag", title: `tag, score ${score(tag.score)}` },
        `${tag.label} `, el("span", { className: "tag-score" }, score(tag.score))));
    }
    return list;
  }

  function card(hit) {
    const name = fileName((hit.uris || [])[0]);
    const button = el("button", {
      type: "button",
      className: "card",
      title: `${(hit.uris || [])[0] || hit.id}\nClick to find images like this one`,
      dataset: { id: hit.id },
    },
    thumbnail(hit.id, name),
    el("span", { className: "card-body" },
      el("span", { className: "card-line" },
        el("span", { className: "vh" }, "similarity "),
        el("span", { className: "score" }, score(hit.score)),
        el("span", { className: "name" }, name)),
      chips(hit)));
    button.addEventListener("click", () => searchById(hit.id, name));
    return el("li", {}, button);
  }

  function renderHits(grid, hits) {
    grid.replaceChildren(...hits.map(card));
  }

  function setStatus(text, kind = "") {
    const status = $("status");
    status.textContent = text;
    status.className = kind ? `status ${kind}` : "status";
  }

  function showQuery(query) {
    const box = $("query");
    box.dataset.kind = query.kind;
    box.dataset.id = query.id || "";
    $("query-kind").textContent = query.label;
    $("query-title").textContent = query.title;
    $("query-sub").textContent = query.sub || "";
    const thumb = $("query-thumb");
    if (query.image) {
      const img = el("img", { alt: "", width: "96", height: "96" });
      img.addEventListener("error", () => img.replaceWith(el("span", { className: "query-glyph" }, "?")), { once: true });
      img.src = query.image;
      thumb.replaceChildren(img);
    } else if (query.id) {
      thumb.replaceChildren(thumbnail(query.id, ""));
    } else {
      thumb.replaceChildren(el("span", { className: "query-glyph", "aria-hidden": "true" },
        query.kind === "text" ? "Aa" : "URL"));
    }
  }

  // ------------------------------------------------------------------------------------------ searching
  function options() {
    const labels = $("label-filter").value.split(",").map((s) => s.trim()).filter(Boolean);
    return { k: Number($("k").value) || 10, filter: labels.map((l) => `label=${l}`), labels };
  }

  function reveal() {
    // On a narrow screen the results sit below the controls: bring them into view for a new query.
    const box = $("query").getBoundingClientRect();
    if (box.top < 0 || box.top > window.innerHeight - 120) {
      const smooth = !window.matchMedia("(prefers-reduced-motion: reduce)").matches;
      $("results").scrollIntoView({ block: "start", behavior: smooth ? "smooth" : "auto" });
    }
  }

  async function search(query, request, { fresh = true } = {}) {
    const seq = ++state.seq;
    state.last = { query, request };
    showQuery(query);
    if (fresh) reveal();
    const grid = $("grid");
    grid.setAttribute("aria-busy", "true");
    grid.classList.add("stale");
    setStatus("Searching…", "busy");
    const opts = options();
    state.lastOptions = JSON.stringify(opts);
    const t0 = performance.now();
    try {
      const { data, started } = await request(opts);
      if (seq !== state.seq) return;
      const answer = Array.isArray(data) ? data[0] : null;
      if (!answer || !Array.isArray(answer.results)) throw new ApiError("The server sent an answer this page cannot read.");
      renderHits(grid, answer.results);
      const took = performance.now() - (started ?? t0);
      const only = opts.labels.length ? ` with label ${opts.labels.join(" or ")}` : "";
      if (answer.error) setStatus(`This query could not be served: ${answer.error}`, "error");
      else if (!answer.results.length) setStatus(`No similar images${only}.`, "empty");
      else setStatus(`${plural(answer.results.length, "result", "results")}${only} in ${ms(took)}.`);
    } catch (error) {
      if (seq !== state.seq) return;
      renderHits(grid, []);
      setStatus(error.message, "error");
    } finally {
      if (seq === state.seq) {
        grid.removeAttribute("aria-busy");
        grid.classList.remove("stale");
      }
    }
  }

  function rerun() {
    // Enter in the filter fires submit, change and search: one search for one change of the options.
    const key = JSON.stringify(options());
    if (state.last && key !== state.lastOptions) search(state.last.query, state.last.request, { fresh: false });
  }

  function searchByImage(file, how) {
    state.file = file;
    if (state.fileUrl) URL.revokeObjectURL(state.fileUrl);
    state.fileUrl = URL.createObjectURL(file);
    const name = file.name && how !== "pasted" ? file.name : "Pasted image";
    const preview = $("preview");
    preview.onerror = () => { // not something the browser can show: the server will say what it is
      preview.hidden = true;
      $("drop-icon").style.display = "";
    };
    preview.src = state.fileUrl;
    preview.hidden = false;
    $("drop-icon").style.display = "none";
    $("drop-name").textContent = name;
    $("add-button").disabled = false;
    setNote($("add-note"), `Adds ${how === "pasted" ? "the pasted image" : name} to the index, with the labels above.`);
    const sizeKb = Math.max(1, Math.round(file.size / 1024));
    const type = file.type ? ` · ${file.type}` : "";
    search({ kind: "image", label: `Images like the one ${how}`, title: name, sub: `${sizeKb.toLocaleString()} KB${type}`,
      image: state.fileUrl },
    (o) => {
      const form = new FormData();
      form.append("image", file, file.name || "pasted.png");
      return api("/v1/search", { method: "POST", form, params: { k: o.k, filter: o.filter }, purpose: "to search" });
    });
  }

  function searchById(id, name) {
    search({ kind: "id", label: "Images like the stored image", title: name || id, sub: id, id },
      (o) => api("/v1/search", { method: "POST", json: { ids: [id], k: o.k, filter: o.filter },
        purpose: "to search" }));
    $("results").focus({ preventScroll: true }); // the clicked card is gone: keep the keyboard near the results
  }

  function searchByUrl(url) {
    search({ kind: "url", label: "Images like the one at", title: url },
      (o) => api("/v1/search", { method: "POST", json: { urls: [url], k: o.k, filter: o.filter },
        purpose: "to search" }));
  }

  function searchByText(text) {
    search({ kind: "text", label: "Images matching", title: `“${text}”` },
      (o) => api("/v1/search", { method: "POST", json: { texts: [text], k: o.k, filter: o.filter },
        purpose: "to search" }));
  }

  // ------------------------------------------------------------------------------------------ adding
  async function addToIndex() {
    const file = state.file;
    if (!file) return;
    const button = $("add-button");
    const note = $("add-note");
    const labels = $("add-labels").value.split(",").map((s) => s.trim()).filter(Boolean);
    const form = new FormData();
    form.append("image", file, file.name || "pasted.png");
    if (labels.length) form.append("labels", labels.join(","));
    button.disabled = true;
    setNote(note, "Adding…", "busy");
    const t0 = performance.now();
    try {
      const { data, status, started } = await api("/v1/images", { method: "POST", form,
        params: { k: options().k }, purpose: "to add images" });
      const took = performance.now() - (started ?? t0); // from the click to the answer
      showAdded(data, status, took);
      setNote(note, `${$("added-msg").textContent} Its tags and neighbours are under “Just added”.`);
      const smooth = !window.matchMedia("(prefers-reduced-motion: reduce)").matches;
      $("added").scrollIntoView({ block: "start", behavior: smooth ? "smooth" : "auto" });
      loadInfo();
    } catch (error) {
      setNote(note, `Not added: ${error.message}`, "error");
    } finally {
      button.disabled = !state.file;
    }
  }

  function showAdded(data, status, took) {
    const section = $("added");
    section.hidden = false;
    const msg = $("added-msg");
    const server = typeof data.seconds === "number" ? ` (server: ${data.seconds.toFixed(3)} s)` : "";
    if (status === 202) {
      msg.textContent = `Accepted (${data.status}) in ${ms(took)}: it becomes searchable once a worker has ` +
        "indexed it.";
    } else {
      const what = { indexed: "Added", present: "Already in the index", updated: "Already in the index; labels merged" };
      msg.textContent = `${what[data.status] || data.status} — searchable in ${ms(took)}${server}.`;
    }
    msg.dataset.status = String(data.status);
    msg.dataset.ms = String(Math.round(took));
    $("added-id").textContent = `id ${data.id}`;
    const tags = $("added-tags");
    tags.replaceChildren();
    if ((data.tags || []).length) {
      tags.append(el("span", { className: "chips-title" }, "Tags from its neighbours:"),
        chips({ labels: [], tags: data.tags }));
    } else if (status !== 202) {
      tags.append(el("span", { className: "chips-title" }, "No tags: none of its neighbours has a label."));
    }
    const neighbours = data.neighbours || [];
    $("added-neighbours-title").hidden = status === 202;
    renderHits($("added-grid"), neighbours);
    if (status !== 202 && !neighbours.length) {
      $("added-grid").append(el("li", { className: "none" }, "No neighbours yet."));
    }
  }

  // ------------------------------------------------------------------------------------------ input
  function firstImage(list) {
    for (const item of Array.from(list || [])) {
      const file = item instanceof File ? item : item.kind === "file" ? item.getAsFile() : null;
      if (file) return file;
    }
    return null;
  }

  function droppedUrl(transfer) {
    const text = transfer.getData("text/uri-list") || transfer.getData("text/plain") || "";
    const line = text.split(/\r?\n/).find((l) => l && !l.startsWith("#"));
    return line && /^https?:\/\//i.test(line.trim()) ? line.trim() : null;
  }

  function initInput() {
    const drop = $("drop");
    $("file").addEventListener("change", (event) => {
      const file = firstImage(event.target.files);
      if (file) searchByImage(file, "chosen");
      event.target.value = ""; // choosing the same file again searches again
    });

    let depth = 0;
    const carriesFiles = (event) => Array.from(event.dataTransfer?.types || []).includes("Files");
    document.addEventListener("dragenter", (event) => {
      if (!carriesFiles(event)) return;
      depth += 1;
      drop.classList.add("dragging");
    });
    document.addEventListener("dragleave", () => {
      depth = Math.max(0, depth - 1);
      if (!depth) drop.classList.remove("dragging");
    });
    document.addEventListener("dragover", (event) => {
      if (carriesFiles(event) || event.target === drop || drop.contains(event.target)) event.preventDefault();
    });
    document.addEventListener("drop", (event) => {
      depth = 0;
      drop.classList.remove("dragging");
      const transfer = event.dataTransfer;
      if (!transfer) return;
      const file = firstImage(transfer.files);
      if (file) {
        event.preventDefault();
        searchByImage(file, "dropped");
        return;
      }
      if (!drop.contains(event.target)) return; // text dropped on an input goes into it
      event.preventDefault();
      const url = droppedUrl(transfer);
      if (url && state.info?.fetch_urls) {
        $("url").value = url;
        searchByUrl(url);
      } else {
        setStatus(url ? "That is a link, not an image file; URL fetching is off on this server " +
          "(LOOKALIKE_FETCH_URLS). Save the image and drop the file." : "Drop an image file.", "error");
      }
    });

    document.addEventListener("paste", (event) => {
      const file = firstImage(event.clipboardData?.items) || firstImage(event.clipboardData?.files);
      if (!file) return; // text pastes into inputs as usual
      event.preventDefault();
      searchByImage(file, "pasted");
    });

    $("url-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const url = $("url").value.trim();
      if (!/^https?:\/\/\S+$/i.test(url)) {
        setNote($("url-note"), "Enter an http:// or https:// address of an image.", "error");
        $("url").focus();
        return;
      }
      setNote($("url-note"), "The server downloads the image at this address and searches with it.");
      searchByUrl(url);
    });
    $("text-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const text = $("text").value.trim();
      if (text) searchByText(text);
    });

    $("options").addEventListener("submit", (event) => {
      event.preventDefault();
      rerun();
    });
    $("k").addEventListener("change", rerun);
    $("label-filter").addEventListener("change", rerun);
    $("label-filter").addEventListener("search", rerun); // the clear (×) of a search field
    $("add-button").addEventListener("click", addToIndex);
  }

  initKey();
  initInput();
  loadInfo();
})();
