// The page of `jaxgpt serve`: streams a completion from POST /v1/completions (server-sent events)
// into #output, one span per character carrying its log-probability and top alternatives; a
// popover shows them, a toggle colours the text by surprisal, a click asks POST /v1/attention
// what the character attended to. Only this server is ever contacted.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const form = $("controls"), output = $("output"), status = $("status"), popover = $("popover");
  const LN2 = Math.log(2);
  const SURPRISAL_MAX_BITS = 8;

  const server = {contextLength: 128, slots: null, modelId: "jaxgpt"};
  let run = null;          // the generation in flight: {controller, started, count, seed, finish}
  let last = null;         // the last finished generation: {body, seed, text, prompt}
  let chars = [];          // per generated character: {ch, logprob, top: {char: logprob} | null}
  let cursor = -1;         // keyboard position in #output
  let popoverIndex = -1;   // the character the popover shows (-1: hidden)
  let attentionView = null;

  // ----------------------------------------------------------------------------- server info
  async function refreshHealth() {
    try {
      const response = await fetch("/health");
      if (!response.ok) return;
      const health = await response.json();
      const m = health.model || {};
      server.contextLength = m.context_length || server.contextLength;
      server.modelId = m.id || server.modelId;
      server.slots = health.slots ? health.slots.total : null;
      $("model-info").textContent = `${m.id} \u00b7 ${m.variant}, ${m.num_blocks} blocks \u00d7 ${m.num_heads} heads, ` +
        `context ${m.context_length} \u00b7 slots ${health.slots.free}/${health.slots.total} free`;
    } catch (e) {
      $("model-info").textContent = "server unreachable";
    }
  }

  // ----------------------------------------------------------------------------- the request
  function unescape(text) {  // "\n", "\t" and "\\" typed in a one-line field
    return text.replace(/\\(n|t|\\)/g, (_, c) => ({n: "\n", t: "\t", "\\": "\\"}[c]));
  }

  function number(id, {integer = false, min = -Infinity, max = Infinity, minOpen = false, optional = false}) {
    const raw = $(id).value.trim();
    const label = document.querySelector(`label[for="${id}"]`).textContent.split("(")[0].trim();
    if (raw === "") {
      if (optional) return undefined;
      throw new Error(`${label}: a value is needed`);
    }
    const value = Number(raw);
    if (!Number.isFinite(value) || (integer && !Number.isInteger(value)) ||
        value < min || value > max || (minOpen && value === min)) {
      const range = `${minOpen ? "(" : "["}${min}, ${max === Infinity ? "\u221e)" : max + "]"}`;
      throw new Error(`${label}: must be ${integer ? "an integer" : "a number"} in ${range}, got ${raw}`);
    }
    return value;
  }

  // The completions body of the form; throws an Error naming the field when a value is invalid.
  function requestBody() {
    const body = {prompt: $("prompt").value, max_tokens: number("max-chars", {integer: true, min: 1}),
                  temperature: number("temperature", {min: 0})};
    const topK = number("top-k", {integer: true, min: 1, optional: true});
    const topP = number("top-p", {min: 0, max: 1, minOpen: true, optional: true});
    const minP = number("min-p", {min: 0, max: 1, optional: true});
    const seed = number("seed", {integer: true, min: 0, max: 2 ** 32 - 1, optional: true});
    if (topK !== undefined) body.top_k = topK;
    if (topP !== undefined) body.top_p = topP;
    if (minP !== undefined) body.min_p = minP;
    if (seed !== undefined) body.seed = seed;
    const stop = unescape($("stop").value);
    if (stop !== "") body.stop = stop;
    if ($("mode").value !== "exact") body.mode = $("mode").value;
    return body;
  }

  // ----------------------------------------------------------------------------- streaming
  function setStatus(text, state) {
    status.textContent = text;
    status.dataset.state = state;
  }

  function rate(count, started) {
    const seconds = (performance.now() - started) / 1000;
    return {seconds, perSecond: seconds > 0 ? count / seconds : 0};
  }

  function showProgress() {
    const {perSecond} = rate(run.count, run.started);
    setStatus(`Generating\u2026 ${run.count} characters \u00b7 ${perSecond.toFixed(1)} chars/s` +
              (run.seed !== undefined ? ` \u00b7 seed ${run.seed}` : ""), "generating");
  }

  function setBusy(busy) {
    $("generate").disabled = busy;
    $("cancel").disabled = !busy;
    $("copy-command").disabled = busy || last === null;
  }

  function surprisalColour(logprob) {
    if (logprob === null || logprob === undefined) return "transparent";
    const t = Math.min(1, (-logprob / LN2) / SURPRISAL_MAX_BITS);
    // white -> amber (#fde68a) -> red (#f87171); dark text stays above 4.5:1 on all of them
    const [a, b, u] = t < 0.5 ? [[255, 255, 255], [253, 230, 138], t * 2] : [[253, 230, 138], [248, 113, 113], t * 2 - 1];
    const mix = a.map((x, i) => Math.round(x + (b[i] - x) * u));
    return `rgb(${mix.join(",")})`;
  }

  function appendText(text, logprobs) {
    const fragment = document.createDocumentFragment();
    [...text].forEach((ch, j) => {
      const entry = {ch, logprob: logprobs ? logprobs.token_logprobs[j] : null,
                     top: logprobs && logprobs.top_logprobs ? logprobs.top_logprobs[j] : null};
      const span = document.createElement("span");
      span.className = ch === "\n" ? "ch newline" : "ch";
      span.textContent = ch;
      span.dataset.index = String(chars.length);
      span.style.setProperty("--surprisal-bg", surprisalColour(entry.logprob));
      chars.push(entry);
      fragment.appendChild(span);
    });
    output.appendChild(fragment);
  }

  function handleEvent(block) {
    for (const line of block.split("\n")) {
      if (!line.startsWith("data:")) continue;
      const data = line.slice(5).trim();
      if (data === "[DONE]") return true;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.seed !== undefined) run.seed = chunk.seed;
      for (const choice of chunk.choices || []) {
        if (choice.index !== 0) continue;
        appendText(choice.text, choice.logprobs);
        run.count += [...choice.text].length;
        if (choice.finish_reason) run.finish = choice.finish_reason;
      }
    }
    return false;
  }

  // The API key, when the server needs one (shown after a 401), goes in every API call.
  function apiHeaders() {
    const key = $("api-key").value.trim();
    return key ? {"Content-Type": "application/json", Authorization: `Bearer ${key}`}
               : {"Content-Type": "application/json"};
  }

  async function errorMessage(response) {
    if (response.status === 401) {
      $("key-row").hidden = false;
      $("api-key").focus();
    }
    try {
      const body = await response.json();
      return body.error ? body.error.message : `HTTP ${response.status}`;
    } catch (e) {
      return `HTTP ${response.status}`;
    }
  }

  async function generate() {
    if (run) return;
    let body;
    try {
      body = requestBody();
    } catch (e) {
      setStatus(e.message, "error");
      return;
    }
    hidePopover();
    output.replaceChildren();
    chars = [];
    cursor = -1;
    $("prompt-echo").textContent = body.prompt;
    $("command").hidden = true;
    last = null;  // "copy as command" describes a finished text only
    run = {controller: new AbortController(), started: performance.now(), count: 0, seed: body.seed, finish: null};
    setBusy(true);
    showProgress();
    const current = run;
    try {
      const response = await fetch("/v1/completions", {
        method: "POST", headers: apiHeaders(), signal: current.controller.signal,
        body: JSON.stringify({...body, stream: true, logprobs: 5})});
      if (!response.ok) throw new Error(await errorMessage(response));
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "", done = false;
      while (!done) {
        const {value, done: ended} = await reader.read();
        if (ended) break;
        buffer += decoder.decode(value, {stream: true});
        let cut;
        while (!done && (cut = buffer.indexOf("\n\n")) >= 0) {
          done = handleEvent(buffer.slice(0, cut));
          buffer = buffer.slice(cut + 2);
        }
        showProgress();
      }
      if (!done) throw new Error("the stream ended before [DONE]");
      const {seconds, perSecond} = rate(current.count, current.started);
      last = {body: {...body, seed: current.seed}, text: chars.map((c) => c.ch).join("")};
      setStatus(`Done: ${current.count} characters in ${seconds.toFixed(2)} s \u00b7 ${perSecond.toFixed(1)} chars/s` +
                ` \u00b7 finish reason: ${current.finish} \u00b7 seed ${current.seed}`, "done");
    } catch (e) {
      if (e.name === "AbortError") {
        setStatus(`Cancelled after ${current.count} characters` +
                  (current.seed !== undefined ? ` \u00b7 seed ${current.seed}` : ""), "cancelled");
      } else {
        setStatus(`Error: ${e.message}`, "error");
      }
    } finally {
      run = null;
      setBusy(false);
      refreshHealth();
    }
  }

  function cancel() {
    if (run) run.controller.abort();  // closing the stream frees the server's slot
  }

  // ----------------------------------------------------------------------------- per character
  function glyph(ch) {
    return ch === "\n" ? "\u21b5" : ch === " " ? "\u2423" : ch === "\t" ? "\u21e5" : ch;
  }

  function percent(logprob) {
    const p = Math.exp(logprob);
    return (100 * p).toFixed(p >= 0.1 ? 1 : 2) + "%";
  }

  function showPopover(index) {
    const entry = chars[index], span = output.children[index];
    if (!entry || !span) return;
    popover.replaceChildren();
    const head = document.createElement("div");
    head.className = "head";
    if (entry.logprob === null || entry.logprob === undefined) {
      head.textContent = `${JSON.stringify(entry.ch)}: no probability reported`;
    } else {
      head.textContent = `${JSON.stringify(entry.ch)} \u00b7 p = ${percent(entry.logprob)} \u00b7 ` +
        `${(-entry.logprob / LN2).toFixed(2)} bits`;
    }
    popover.appendChild(head);
    if (entry.top) {
      const list = document.createElement("ol");
      list.setAttribute("aria-label", "likeliest characters at this position");
      // Likeliest first (a JS object lists digit keys first, whatever the JSON's order).
      const ranked = Object.entries(entry.top).sort((a, b) => (b[1] ?? -Infinity) - (a[1] ?? -Infinity));
      const peak = Math.exp(ranked.length ? ranked[0][1] ?? -Infinity : -Infinity);
      for (const [ch, lp] of ranked) {
        const item = document.createElement("li");
        if (ch === entry.ch) item.className = "chosen";
        const label = document.createElement("span");
        label.textContent = glyph(ch);
        const track = document.createElement("span");
        const bar = document.createElement("span");
        bar.className = "bar";
        bar.style.display = "block";
        bar.style.width = `${Math.max(2, peak > 0 ? 100 * Math.exp(lp ?? -Infinity) / peak : 0).toFixed(1)}%`;  // of the likeliest
        track.appendChild(bar);
        const pct = document.createElement("span");
        pct.className = "pct";
        pct.textContent = lp === null ? "0%" : percent(lp);
        item.append(label, track, pct);
        list.appendChild(item);
      }
      popover.appendChild(list);
    }
    popover.hidden = false;
    popoverIndex = index;
    const box = span.getBoundingClientRect(), size = popover.getBoundingClientRect();
    const left = Math.min(Math.max(4, box.left), window.innerWidth - size.width - 4);
    const below = box.bottom + 6 + size.height <= window.innerHeight;
    popover.style.left = `${left}px`;
    popover.style.top = `${below ? box.bottom + 6 : Math.max(4, box.top - size.height - 6)}px`;
  }

  function hidePopover() {
    popover.hidden = true;
    popoverIndex = -1;
  }

  function indexOf(target) {
    const span = target.closest && target.closest("#output .ch");
    return span ? Number(span.dataset.index) : -1;
  }

  // ----------------------------------------------------------------------------- attention
  async function showAttention(index) {
    output.querySelectorAll(".ch.selected").forEach((s) => s.classList.remove("selected"));
    const span = output.children[index];
    if (!span) return;
    span.classList.add("selected");
    const prompt = $("prompt-echo").textContent;
    const context = (prompt === "" ? "\n" : prompt) + chars.map((c) => c.ch).join("");  // "" starts from the seed newline
    const end = context.length - chars.length + index + 1;
    const text = context.slice(Math.max(0, end - server.contextLength), end);
    const box = $("attention");
    try {
      const response = await fetch("/v1/attention", {method: "POST", headers: apiHeaders(),
                                                      body: JSON.stringify({text})});
      if (!response.ok) throw new Error(await errorMessage(response));
      const data = await response.json();
      if (!attentionView) attentionView = JaxgptAttention.mount(box);
      attentionView.show({tokens: data.tokens, query: data.query, weights: data.weights});
    } catch (e) {
      attentionView = null;
      box.replaceChildren();
      const p = document.createElement("p");
      p.className = "empty";
      p.textContent = `Attention unavailable: ${e.message}`;
      box.appendChild(p);
    }
  }

  // ----------------------------------------------------------------------------- copy as command
  function shellQuote(text) {
    if (/^[A-Za-z0-9_.,:/=+-]+$/.test(text)) return text;
    if (/[\n\t\r]/.test(text)) {  // bash's $'...' keeps newlines and tabs visible
      return "$'" + text.replace(/\\/g, "\\\\").replace(/'/g, "\\'").replace(/\n/g, "\\n")
        .replace(/\t/g, "\\t").replace(/\r/g, "\\r") + "'";
    }
    return "'" + text.replace(/'/g, "'\\''") + "'";
  }

  function commands(body) {
    const flags = [["--prompt", body.prompt], ["--num-chars", body.max_tokens], ["--seed", body.seed],
                   ["--temperature", body.temperature], ["--top-k", body.top_k], ["--top-p", body.top_p],
                   ["--min-p", body.min_p], ["--stop", body.stop], ["--mode", body.mode],
                   ["--slots", server.slots]];
    const cli = ["jaxgpt generate"];
    for (const [flag, value] of flags) {
      if (value !== undefined && value !== null) cli.push(`${flag} ${shellQuote(String(value))}`);
    }
    const json = JSON.stringify(body);
    const auth = $("api-key").value.trim() ? ` -H "Authorization: Bearer $JAXGPT_API_KEY"` : "";
    const curl = `curl -s ${location.origin}/v1/completions -H 'Content-Type: application/json'${auth} ` +
                 `-d ${shellQuote(json)}`;
    return `${cli.join(" ")}\n${curl}`;
  }

  async function copyCommand() {
    if (!last) return;
    const text = commands(last.body);
    const pre = $("command");
    pre.textContent = text;
    pre.hidden = false;
    try {
      await navigator.clipboard.writeText(text);
      pre.dataset.copied = "yes";
    } catch (e) {  // no clipboard permission (e.g. plain http on another host): select it instead
      pre.dataset.copied = "no";
      window.getSelection().selectAllChildren(pre);
    }
  }

  // ----------------------------------------------------------------------------- wiring
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    generate();
  });
  $("cancel").addEventListener("click", cancel);
  $("random-seed").addEventListener("click", () => {
    $("seed").value = String(crypto.getRandomValues(new Uint32Array(1))[0]);
  });
  $("surprisal").addEventListener("change", (e) => {
    output.classList.toggle("surprisal", e.target.checked);
    $("result").classList.toggle("surprisal-on", e.target.checked);
  });
  $("copy-command").addEventListener("click", copyCommand);
  // Hover shows the popover for a mouse; a tap (a click) shows it until the next tap elsewhere.
  output.addEventListener("pointerover", (e) => {
    const i = indexOf(e.target);
    if (e.pointerType === "mouse" && i >= 0) showPopover(i);
  });
  output.addEventListener("pointerleave", (e) => {
    if (e.pointerType === "mouse") hidePopover();
  });
  document.addEventListener("click", (e) => {
    if (indexOf(e.target) < 0) hidePopover();
  });
  output.addEventListener("click", (e) => {
    const i = indexOf(e.target);
    if (i < 0) return;
    cursor = i;
    showPopover(i);
    showAttention(i);
  });
  // Keyboard: #output is one tab stop; arrows move between characters, Enter shows attention.
  output.tabIndex = 0;
  output.addEventListener("keydown", (e) => {
    if (!chars.length) return;
    const moves = {ArrowRight: 1, ArrowLeft: -1, Home: -Infinity, End: Infinity};
    if (e.key in moves) {
      e.preventDefault();
      cursor = Math.min(chars.length - 1, Math.max(0, (cursor < 0 ? 0 : cursor) + moves[e.key]));
      output.querySelectorAll(".ch.selected").forEach((s) => s.classList.remove("selected"));
      output.children[cursor].classList.add("selected");
      output.children[cursor].scrollIntoView({block: "nearest"});
      showPopover(cursor);
    } else if ((e.key === "Enter" || e.key === " ") && cursor >= 0) {
      e.preventDefault();
      showAttention(cursor);
    }
  });
  output.addEventListener("blur", hidePopover);
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape") {
      hidePopover();
      cancel();
    } else if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
      e.preventDefault();
      generate();
    }
  });
  window.addEventListener("scroll", () => popoverIndex >= 0 && showPopover(popoverIndex), {passive: true});
  refreshHealth();
})();
