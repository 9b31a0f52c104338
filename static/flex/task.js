// The live task page: renders each task.update snapshot from the WebSocket in place.
// The server renders the same snapshot first, so the page works (statically) without this.
(function () {
  "use strict";
  const root = document.getElementById("task-page");
  if (!root) return;
  const $ = (id) => document.getElementById(id);
  const WEI = 10n ** 18n;
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
    // Exact, like the server's wei_to_eth: BigInt, never a float.
    if (wei === null || wei === undefined || wei === "") return "–";
    let n = BigInt(wei);
    const sign = n < 0n ? "-" : "";
    if (n < 0n) n = -n;
    const frac = (n % WEI).toString().padStart(18, "0").replace(/0+$/, "");
    return sign + (n / WEI).toString() + (frac ? "." + frac : "");
  }
  function short(text) {
    text = String(text || "");
    return text.length <= 14 ? text : text.slice(0, 8) + "…" + text.slice(-4);
  }
  function pct(x) { return x === null || x === undefined ? "–" : (x * 100).toFixed(1) + "%"; }
  function num(x, digits) { return x === null || x === undefined ? "–" : Number(x).toFixed(digits); }
  const names = (() => {
    const el = $("device-names");
    try { return el ? JSON.parse(el.textContent) : {}; } catch (e) { return {}; }
  })();
  // Names of devices first seen live are asked for once; tables re-render when they arrive.
  let asking = false;
  let last = null;
  function learnNames(s) {
    const unknown = [...s.bids, ...s.selected].some((d) => !(d.device in names));
    if (!unknown || asking) return;
    asking = true;
    fetch(root.dataset.devicesUrl, { headers: { Accept: "application/json" } })
      .then((res) => (res.ok ? res.json() : {}))
      .then((found) => {
        for (const d of [...s.bids, ...s.selected]) names[d.device] = found[d.device] || "";
        if (last) render(last);
      })
      .catch(() => {})
      .finally(() => { asking = false; });
  }
  function device(address) {
    const name = names[address];
    return name
      ? `<span class="dev" title="${esc(address)}"><strong>${esc(name)}</strong><span class="hash muted">${esc(short(address))}</span></span>`
      : hash(address);
  }
  function hash(value, full) {
    return `<span class="hash" title="${esc(value)}">${esc(full ? value : short(value))}</span>`;
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

  // ---------------------------------------------------------------- the view model
  // The same derivation as marketplace.views.task_page, for each live snapshot.

  const STEPS = [["posted", "Posted"], ["bidding", "Bidding"], ["training", "Training"],
    ["trained", "Trained"], ["settled", "Settled"]];
  const AT = {
    pending: [0, false, "Posting"], bidding: [1, false, null], running: [2, false, null],
    trained: [3, false, null], finalized: [5, false, null], cancelled: [1, true, "Cancelled"],
    failed: [2, true, "Selection failed"], aborted: [2, true, "Aborted"],
  };

  function eventLabel(name) {
    const words = name.replace(/(?!^)(?=[A-Z])/g, " ").split(" ");
    return [words[0], ...words.slice(1).map((w) => w.toLowerCase())].join(" ");
  }
  function transactionRows(events) {
    // One row per transaction, as marketplace.views.transaction_rows.
    const rowsByHash = new Map();
    for (const e of events) {
      if (!rowsByHash.has(e.tx_hash)) rowsByHash.set(e.tx_hash, { tx_hash: e.tx_hash, block: e.block, names: [] });
      rowsByHash.get(e.tx_hash).names.push(e.name);
    }
    return [...rowsByHash.values()].map((row) => {
      const counts = new Map();
      for (const n of row.names) counts.set(n, (counts.get(n) || 0) + 1);
      row.label = [...counts].map(([n, k]) => (k > 1 ? `${k}× ${eventLabel(n).toLowerCase()}` : eventLabel(n))).join(" · ");
      return row;
    });
  }

  function present(s) {
    const [at, bad, label] = AT[s.state] || [0, false, null];
    const steps = STEPS.map(([key, text], i) => ({
      key,
      label: i === at && label ? label : text,
      status: i < at ? "done" : i === at ? (bad ? "bad" : "now") : "",
    }));
    const measured = s.rounds.filter((r) => r.number >= 1 && r.accuracy !== null && r.accuracy !== undefined);
    const latest = measured.length ? measured[measured.length - 1] : null;
    let note = "";
    if (s.state === "bidding") note = "bidding open";
    else if (s.state === "running" && s.current_round !== null && s.current_round !== undefined) {
      note = `training round ${s.current_round + 1} of ${s.round_count}`;
    } else if (s.state === "trained" || s.state === "finalized") note = "all rounds done";
    return Object.assign({}, s, {
      tx_rows: transactionRows(s.transactions),
      steps,
      done_rounds: Math.max(s.published_rounds - 1, 0),
      round_note: note,
      latest_accuracy: latest ? latest.accuracy : null,
      latest_loss: latest ? latest.loss : null,
      model_ready: s.state === "trained" || s.state === "finalized",
    });
  }

  // ---------------------------------------------------------------- the page

  function drawChart(rounds) {
    const el = $("chart");
    if (el) el.innerHTML = chart(rounds, el.clientWidth);
  }

  function render(s) {
    const state = s.state;
    const badge = $("task-state");
    if (badge && badge.dataset.state !== state) {
      badge.className = "badge state-" + state;
      badge.dataset.state = state;
      badge.textContent = LABELS[state] || state;
      flash(badge);
    }
    if (s.chain_task_id) setText("task-chain-id", "#" + s.chain_task_id);
    const link = $("model-link");
    if (link) link.classList.toggle("hidden", !s.model_ready);

    const progress = $("progress");
    if (progress && s.steps) {
      progress.innerHTML = s.steps.map((st) => `<li class="${esc(st.status)}" data-step="${esc(st.key)}">${esc(st.label)}</li>`).join("");
    }
    setText("stat-budget", eth(s.budget_wei));
    setText("stat-budget-sub", s.refund_wei && s.refund_wei !== "0" ? `${eth(s.refund_wei)} ETH refunded` : "in escrow");
    setHTML("stat-round", `${esc(s.done_rounds)} <small>/ ${esc(s.round_count)}</small>`);
    setText("stat-round-sub", s.round_note || "");
    setText("stat-accuracy", pct(s.latest_accuracy));
    setText("stat-loss", s.latest_loss === null || s.latest_loss === undefined ? "after the first round" : "loss " + num(s.latest_loss, 4));
    setHTML("stat-devices", `${s.selected.length} <small>selected</small>`);
    setText("stat-bids", `${s.bids.length} bid${s.bids.length === 1 ? "" : "s"} · ${s.min_trainers}–${s.max_trainers} trainers wanted`);

    drawChart(s.rounds);

    rows("rounds-body", s.rounds, (r) => `<tr><td>${esc(r.number)}</td><td class="num">${pct(r.accuracy)}</td><td class="num">${num(r.loss, 4)}</td><td class="num">${esc(r.updates_aggregated)}</td><td class="wide">${hash(r.global_model_id)}</td><td class="num wide">${esc(r.gas_used ?? "–")}</td></tr>`, "No global model yet.", 6);
    rows("bids-body", s.bids, (b) => `<tr><td>${device(b.device)}</td><td><span class="badge role">${esc(b.role)}</span></td><td class="num">${eth(b.price_per_round_wei)} ETH</td><td class="num">${esc(b.samples)}</td></tr>`, "No bids yet. Devices that fit the task bid while bidding is open.", 4);
    rows("selected-body", s.selected, (d) => `<tr><td>${device(d.device)}</td><td><span class="badge role">${esc(d.role)}${d.position === null || d.position === undefined ? "" : " #" + esc(d.position)}</span></td><td class="num">${eth(d.price_per_round_wei)} ETH</td></tr>`, "Selected when bidding closes.", 3);
    rows("tx-body", s.tx_rows, (t) => `<tr><td>${esc(t.label)}</td><td class="clip">${hash(t.tx_hash, true)}</td><td class="num">${esc(t.block)}</td></tr>`, "No transactions seen yet.", 3);
    rows("payouts-body", s.payouts, (p) => `<tr><td>${p.reason === "refund" ? "<strong>You</strong>" : device(p.account)}</td><td>${esc(p.reason)}</td><td class="num">${eth(p.amount_wei)} ETH</td></tr>`, "Paid when the task is settled.", 3);
    const refund = $("refund-note");
    if (refund) {
      refund.innerHTML = s.refund_wei && s.refund_wei !== "0"
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
      if (msg.type === "task.update" && msg.snapshot) {
        last = present(msg.snapshot);
        render(last);
        learnNames(last);
        root.dataset.updates = String(Number(root.dataset.updates || 0) + 1);
      }
    };
    ws.onclose = () => {
      status(false, "reconnecting…");
      setTimeout(connect, delay);
      delay = Math.min(delay * 2, 10000);
    };
  }

  // The server rendered everything but the chart, which is drawn here from the same snapshot.
  const initial = $("snapshot-data");
  if (initial) last = present(JSON.parse(initial.textContent));
  if (last) drawChart(last.rounds);
  let resizing = null;
  window.addEventListener("resize", () => {
    clearTimeout(resizing);
    resizing = setTimeout(() => { if (last) drawChart(last.rounds); }, 150);
  });
  window.FlexTask = { present, render, chart };
  connect();
})();
