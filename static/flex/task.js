// The live task page: renders each task.update message from the WebSocket in place. The
// server computes everything shown (marketplace/task_page.py: the snapshot and its view);
// this only renders it, escaping every value. The server renders the first message too, so
// the page works (statically) without this.
(function () {
  "use strict";
  const root = document.getElementById("task-page");
  if (!root) return;
  const $ = (id) => document.getElementById(id);
  const LABELS = {
    pending: "Pending", bidding: "Bidding", running: "Running", trained: "Trained",
    finalized: "Finalized", failed: "Failed", cancelled: "Cancelled", aborted: "Aborted",
  };

  // ---------------------------------------------------------------- formatting

  function esc(value) {
    return String(value === null || value === undefined ? "" : value).replace(/[&<>"']/g, (c) => (
      { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
  }
  function eth(wei) {
    const text = FlexUnits.eth(wei);
    return text === "" ? "–" : esc(text);
  }
  function short(text) {
    text = String(text || "");
    return text.length <= 14 ? text : text.slice(0, 8) + "…" + text.slice(-4);
  }
  function pct(x) { return x === null || x === undefined ? "–" : (x * 100).toFixed(1) + "%"; }
  function num(x, digits) { return x === null || x === undefined ? "–" : Number(x).toFixed(digits); }
  let names = {};
  function device(address) {
    const name = names[address];
    return name
      ? `<span class="dev" title="${esc(address)}"><strong>${esc(name)}</strong><span class="hash muted">${esc(short(address))}</span></span>`
      : hash(address);
  }
  // A hash with a copy button, and a block-explorer link for transactions when one is set
  // (the same markup as the chain_ref template tag).
  const explorer = root.dataset.explorer || "";
  function hash(value, full, kind) {
    const link = explorer && (kind === "tx" || kind === "address")
      ? ` <a class="explorer" href="${esc(explorer)}/${kind}/${esc(value)}" target="_blank" rel="noopener noreferrer" title="Open in the block explorer">explorer</a>`
      : "";
    return `<span class="ref"><span class="hash" title="${esc(value)}">${esc(full ? value : short(value))}</span>`
      + `<button type="button" class="copy" data-copy="${esc(value)}" aria-label="Copy ${esc(value)}">copy</button>${link}</span>`;
  }
  function rows(tbody, items, render, emptyText, cols) {
    const el = $(tbody);
    if (!el) return;
    el.innerHTML = items.length
      ? items.map(render).join("")
      : `<tr><td colspan="${cols}" class="empty">${esc(emptyText)}</td></tr>`;
  }
  function setText(id, text) { const el = $(id); if (el && el.textContent !== String(text)) { el.textContent = text; flash(el); } }
  function setHTML(id, html) { const el = $(id); if (el && el.innerHTML !== html) { el.innerHTML = html; flash(el); } }
  function flash(el) {
    const card = el.closest(".card") || el;
    card.classList.remove("flash"); void card.offsetWidth; card.classList.add("flash");
  }

  // ---------------------------------------------------------------- the chart

  function chart(rounds, width) {
    // Numbers only from here on: the SVG is built as text.
    const numeric = (v) => (v === null || v === undefined ? null : Number(v));
    rounds = rounds.map((r) => ({ number: Number(r.number), accuracy: numeric(r.accuracy), loss: numeric(r.loss) }));
    const pts = rounds.filter((r) => r.accuracy !== null && r.accuracy !== undefined
      || r.loss !== null && r.loss !== undefined);
    if (!pts.length) {
      return '<div class="chart-empty">The chart fills in as the aggregator publishes each round.</div>';
    }
    // Drawn at the container's own width, so the labels keep their size on a phone.
    const W = Math.max(280, Math.round(width || 640)), H = W < 480 ? 200 : 260, L = 40, R = 44, T = 14, B = 28;
    const n = Math.max(...pts.map((r) => r.number), 1);
    const first = Math.min(...pts.map((r) => r.number));
    const x = (k) => L + (n === first ? (W - L - R) / 2 : ((k - first) / (n - first)) * (W - L - R));
    const losses = pts.map((r) => r.loss).filter((v) => v !== null && v !== undefined);
    const lossMax = Math.max(...losses, 0.0001) * 1.1;
    const ya = (v) => T + (1 - v) * (H - T - B);
    const yl = (v) => T + (1 - v / lossMax) * (H - T - B);
    let svg = `<svg class="chart" viewBox="0 0 ${W} ${H}" role="img" aria-label="accuracy and loss by round">`;
    svg += '<defs><linearGradient id="accFill" x1="0" y1="0" x2="0" y2="1">'
      + '<stop offset="0" style="stop-color:var(--brand);stop-opacity:.22"/><stop offset="1" style="stop-color:var(--brand);stop-opacity:0"/></linearGradient></defs>';
    svg += '<g class="grid">';
    for (let i = 0; i <= 4; i++) {
      const y = T + (i / 4) * (H - T - B);
      svg += `<line x1="${L}" x2="${W - R}" y1="${y}" y2="${y}"/>`;
    }
    svg += '</g><g class="axis">';
    for (let i = 0; i <= 4; i++) {
      const y = T + (i / 4) * (H - T - B);
      svg += `<text x="${L - 8}" y="${y + 4}" text-anchor="end">${100 - i * 25}%</text>`;
      svg += `<text x="${W - R + 8}" y="${y + 4}">${(lossMax * (1 - i / 4)).toFixed(2)}</text>`;
    }
    const step = Math.max(1, Math.ceil((n - first + 1) / 10));
    for (let k = first; k <= n; k += step) svg += `<text x="${x(k)}" y="${H - 8}" text-anchor="middle">${k}</text>`;
    svg += "</g>";
    const acc = pts.filter((r) => r.accuracy !== null && r.accuracy !== undefined);
    if (acc.length) {
      const line = acc.map((r, i) => `${i ? "L" : "M"}${x(r.number).toFixed(1)},${ya(r.accuracy).toFixed(1)}`).join(" ");
      const base = ya(0).toFixed(1);
      svg += `<path class="area" d="${line} L${x(acc[acc.length - 1].number).toFixed(1)},${base} L${x(acc[0].number).toFixed(1)},${base} Z"/>`;
      svg += `<path class="acc" d="${line}"/>`;
      svg += acc.map((r) => `<circle class="acc-dot" cx="${x(r.number)}" cy="${ya(r.accuracy)}" r="3.5"><title>round ${r.number}: ${pct(r.accuracy)}</title></circle>`).join("");
    }
    const lossPts = pts.filter((r) => r.loss !== null && r.loss !== undefined);
    if (lossPts.length) {
      svg += `<path class="loss" d="${lossPts.map((r, i) => `${i ? "L" : "M"}${x(r.number).toFixed(1)},${yl(r.loss).toFixed(1)}`).join(" ")}"/>`;
      svg += lossPts.map((r) => `<circle class="loss-dot" cx="${x(r.number)}" cy="${yl(r.loss)}" r="3"><title>round ${r.number}: loss ${num(r.loss, 4)}</title></circle>`).join("");
    }
    return svg + "</svg>";
  }

  // ---------------------------------------------------------------- a late round

  // What the page says of a round running late, from view.round_wait (task_page.round_wait):
  // time passes without a message, so this is worked out here, against the chain's clock.
  function waitNote(w) {
    if (!w) return "";
    const offset = Number(w.clock_offset_s || 0);
    const now = Date.now() / 1000 + offset;
    const at = (t) => new Date((t - offset) * 1000).toLocaleTimeString();
    const who = (list) => list.map((a) => names[a] || short(a)).join(", ");
    const late = Number(w.expected_by) - Number(w.started_at);
    if (w.missing.length && now >= w.deadline) {
      return `Round ${w.round}: the deadline passed at ${at(w.deadline)} without an update from `
        + `${who(w.missing)}. The aggregator closes the round with the updates that arrived; `
        + "a trainer without one is not paid for this round.";
    }
    if (w.missing.length && now >= w.expected_by) {
      return `Round ${w.round} is waiting on ${who(w.missing)}: no update `
        + `${Math.round(now - w.started_at)} s after the round began (expected within ${Math.round(late)} s). `
        + `At ${at(w.deadline)} the round closes with the updates that arrived; `
        + "a trainer without one is not paid for this round.";
    }
    if (!w.missing.length && now >= Number(w.deadline) + late) {
      return `Round ${w.round}: every update is in, but the aggregator ${who([w.aggregator])} has `
        + `not published the new model yet. It is due by ${at(w.publish_due)}; after that the task `
        + "is aborted and what was not earned is refunded.";
    }
    return "";
  }
  function drawWait(w) {
    const el = $("round-wait");
    if (!el) return;
    const text = waitNote(w);
    el.classList.toggle("hidden", !text);
    if (el.textContent !== text) el.textContent = text;
  }

  // ---------------------------------------------------------------- the page

  function drawChart(rounds) {
    const el = $("chart");
    if (el) el.innerHTML = chart(rounds, el.clientWidth);
  }

  let last = null;
  function render(msg) {
    last = msg;
    const s = msg.snapshot;
    const v = msg.view;
    names = v.device_names || {};
    const state = s.state;
    const badge = $("task-state");
    if (badge && badge.dataset.state !== state) {
      badge.className = "badge state-" + state;
      badge.dataset.state = state;
      badge.textContent = LABELS[state] || String(state);
      flash(badge);
    }
    setText("task-chain-id", "#" + s.id);
    const link = $("model-link");
    if (link) link.classList.toggle("hidden", !v.model_ready);
    const cancel = $("cancel-task");
    if (cancel) cancel.classList.toggle("hidden", state !== "bidding" && state !== "pending");

    const progress = $("progress");
    if (progress && v.steps) {
      progress.innerHTML = v.steps.map((st) => `<li class="${esc(st.status)}" data-step="${esc(st.key)}">${esc(st.label)}</li>`).join("");
    }
    setText("stat-budget", FlexUnits.eth(s.budget_wei) || "–");
    setText("stat-budget-sub", v.refunded ? `${FlexUnits.eth(s.refund_wei)} ETH refunded` : "in escrow");
    setHTML("stat-round", `${esc(v.done_rounds)} <small>/ ${esc(s.rounds)}</small>`);
    setText("stat-round-sub", v.round_note || "");
    setText("stat-accuracy", pct(v.latest_accuracy));
    setText("stat-loss", v.latest_loss === null || v.latest_loss === undefined ? "after the first round" : "loss " + num(v.latest_loss, 4));
    setHTML("stat-devices", `${esc(v.trainers_selected)} <small>selected</small>`);
    setText("stat-bids", `${s.min_trainers}–${s.max_trainers} wanted · ${s.bids.length} bid${s.bids.length === 1 ? "" : "s"}${s.aggregator ? " · plus the aggregator" : ""}`);

    drawChart(s.rounds_published);
    drawWait(v.round_wait);

    rows("rounds-body", s.rounds_published, (r) => `<tr><td>${esc(r.number)}</td><td class="num">${pct(r.accuracy)}</td><td class="num">${num(r.loss, 4)}</td><td class="num">${esc(r.updates_aggregated)}</td><td class="wide">${hash(r.global_model_id)}</td><td class="num wide">${esc(r.gas_used ?? "–")}</td></tr>`, "No global model yet.", 6);
    rows("bids-body", s.bids, (b) => `<tr><td>${device(b.device)}</td><td><span class="badge role">${esc(b.role)}</span></td><td class="num">${eth(b.price_per_round_wei)} ETH</td><td class="num wide">${esc(b.samples)}</td></tr>`, "No bids yet. Devices that fit the task bid while bidding is open.", 4);
    rows("selected-body", s.selected, (d) => `<tr><td>${device(d.device)}</td><td><span class="badge role">${esc(d.role)}${d.position === null || d.position === undefined ? "" : " #" + esc(d.position)}</span></td><td class="num">${eth(d.price_per_round_wei)} ETH</td></tr>`, "Selected when bidding closes.", 3);
    rows("tx-body", v.tx_rows, (t) => `<tr><td>${esc(t.label)}</td><td class="clip">${hash(t.tx_hash, true, "tx")}</td><td class="num">${esc(t.block_number)}</td></tr>`, "No transactions seen yet.", 3);
    const head = $("contrib-head");
    if (head) {
      head.innerHTML = `<tr><th>Trainer</th>${(v.contribution_rounds || []).map((r) => `<th class="num">Round ${esc(r)}</th>`).join("")}<th class="num">Paid</th></tr>`;
    }
    rows("contrib-body", v.contribution_rows || [], (c) => `<tr><td>${device(c.trainer)}</td>${c.cells.map((cell) => `<td class="num">${esc(cell)}</td>`).join("")}<td class="num">${c.paid_wei === null || c.paid_wei === undefined ? "–" : eth(c.paid_wei) + " ETH"}</td></tr>`, "Scored as rounds close.", 2);
    setText("pay-note", v.pay_note || "");
    rows("payouts-body", s.payouts, (p) => `<tr><td>${p.account === s.buyer_address ? "<strong>You</strong>" : device(p.account)}</td><td>${esc(p.reason)}</td><td class="num">${eth(p.amount_wei)} ETH</td></tr>`, "Paid when the task is settled.", 3);
    const refund = $("refund-note");
    if (refund) {
      refund.innerHTML = v.refunded
        ? `Refunded to you: <strong>${eth(s.refund_wei)} ETH</strong>.`
        : "What is not earned comes back to your wallet.";
    }
  }

  // ---------------------------------------------------------------- the socket

  const live = $("live");
  const liveText = $("live-text");
  function status(on, text) {
    if (!live) return;
    live.classList.toggle("on", on);
    live.classList.toggle("off", !on);
    liveText.textContent = text;
  }

  let delay = 500;
  function connect() {
    const scheme = location.protocol === "https:" ? "wss://" : "ws://";
    const ws = new WebSocket(scheme + location.host + root.dataset.wsPath);
    ws.onopen = () => { delay = 500; status(true, "live"); };
    ws.onmessage = (event) => {
      let msg;
      try { msg = JSON.parse(event.data); } catch (e) { return; }
      if (msg.type === "task.update" && msg.snapshot && msg.view) {
        render(msg);
        root.dataset.updates = String(Number(root.dataset.updates || 0) + 1);
      }
    };
    ws.onclose = () => {
      status(false, "reconnecting…");
      setTimeout(connect, delay);
      delay = Math.min(delay * 2, 10000);
    };
  }

  // The server rendered everything but the chart, which is drawn here from the same message.
  const initial = $("task-data");
  if (initial) last = JSON.parse(initial.textContent);
  if (last) drawChart(last.snapshot.rounds_published);
  if (last) names = last.view.device_names || {};
  // Time passes without messages: the late-round warning and "posted … ago" follow it here.
  function postedAgo() {
    const el = $("posted");
    if (!el) return;
    const minutes = Math.max(0, Math.floor((Date.now() - Date.parse(el.getAttribute("datetime"))) / 60000));
    const text = minutes < 1 ? "just now" : minutes < 60 ? `${minutes} minute${minutes === 1 ? "" : "s"} ago`
      : minutes < 2880 ? `${Math.floor(minutes / 60)} hour${minutes < 120 ? "" : "s"} ago`
      : `${Math.floor(minutes / 1440)} days ago`;
    if (el.textContent !== text) el.textContent = text;
  }
  postedAgo();
  if (last) drawWait(last.view.round_wait);
  setInterval(() => { if (last) drawWait(last.view.round_wait); postedAgo(); }, 2000);
  let resizing = null;
  window.addEventListener("resize", () => {
    clearTimeout(resizing);
    resizing = setTimeout(() => { if (last) drawChart(last.snapshot.rounds_published); }, 150);
  });
  window.FlexTask = { render, chart };
  connect();
})();
