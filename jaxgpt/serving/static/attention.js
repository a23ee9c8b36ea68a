// The attention view: how much one character (the query) attended to each earlier character of
// its window, for a chosen block and head, or for all heads of a block as small multiples.
// Shared by the page served by `jaxgpt serve` and the self-contained HTML of `jaxgpt attention`.
//
//   const view = JaxgptAttention.mount(element);   // builds the block / head selectors
//   view.show({tokens, query, weights});           // tokens: the window's characters,
//                                                  // weights[block][head][s] for s = 0..query
"use strict";

window.JaxgptAttention = (function () {
  // Visible stand-ins for characters that draw nothing on their own.
  function glyph(ch) {
    if (ch === "\n") return "\u21b5\n";
    if (ch === "\t") return "\u21e5";
    return ch;
  }

  // Highlight colour for a weight relative to the row's largest: white to blue (#3b82f6). The
  // text stays dark ink, at 4.8:1 contrast or more even on the deepest blue.
  function paint(span, weight, peak) {
    const level = peak > 0 ? weight / peak : 0;
    const mix = [255 + (59 - 255) * level, 255 + (130 - 255) * level, 255 + (246 - 255) * level].map(Math.round);
    span.style.backgroundColor = `rgb(${mix.join(",")})`;
  }

  function percent(w) {
    return (100 * w).toFixed(w >= 0.1 ? 1 : 2) + "%";
  }

  // One rendering of the window, its characters coloured by one head's weights.
  function drawText(tokens, query, row, title) {
    const box = document.createElement("div");
    box.className = "attn-text";
    if (title) {
      const h = document.createElement("div");
      h.className = "attn-title";
      h.textContent = title;
      box.appendChild(h);
    }
    const body = document.createElement("div");
    body.className = "attn-chars";
    const peak = Math.max(...row);
    for (let s = 0; s <= query; s++) {
      const span = document.createElement("span");
      span.className = s === query ? "attn-ch attn-query" : "attn-ch";
      span.textContent = glyph(tokens[s]);
      span.title = `${JSON.stringify(tokens[s])} at ${s}: ${percent(row[s])}`;
      span.dataset.weight = String(row[s]);
      paint(span, row[s], peak);
      body.appendChild(span);
    }
    box.appendChild(body);
    return box;
  }

  function option(value, label) {
    const o = document.createElement("option");
    o.value = String(value);
    o.textContent = label;
    return o;
  }

  function mount(root) {
    root.replaceChildren();
    const bar = document.createElement("div");
    bar.className = "attn-controls";
    const blockLabel = document.createElement("label");
    blockLabel.textContent = "Block ";
    const block = document.createElement("select");
    block.id = "attn-block";
    blockLabel.appendChild(block);
    const headLabel = document.createElement("label");
    headLabel.textContent = "Head ";
    const head = document.createElement("select");
    head.id = "attn-head";
    headLabel.appendChild(head);
    const caption = document.createElement("span");
    caption.className = "attn-caption";
    bar.append(blockLabel, headLabel, caption);
    const body = document.createElement("div");
    body.className = "attn-body";
    root.append(bar, body);
    let current = null;

    function fill(select, count, all) {
      const keep = select.value;
      select.replaceChildren();
      if (all) select.appendChild(option("all", "all heads"));
      for (let i = 0; i < count; i++) select.appendChild(option(i, String(i)));
      if ([...select.options].some((o) => o.value === keep)) select.value = keep;
    }

    function draw() {
      if (!current) return;
      const {tokens, query, weights} = current;
      const b = Number(block.value);
      body.replaceChildren();
      const heads = head.value === "all" ? weights[b].map((_, h) => h) : [Number(head.value)];
      body.classList.toggle("attn-multiples", heads.length > 1);
      for (const h of heads) {
        body.appendChild(drawText(tokens, query, weights[b][h], heads.length > 1 ? `head ${h}` : ""));
      }
      caption.textContent = `query ${JSON.stringify(tokens[query])} (position ${query} of its window); ` +
        `colour: weight relative to the row's largest`;
    }

    block.addEventListener("change", draw);
    head.addEventListener("change", draw);
    return {
      show(view) {
        current = view;
        fill(block, view.weights.length, false);
        fill(head, view.weights[0].length, true);
        draw();
      },
    };
  }

  return {mount, glyph};
})();
