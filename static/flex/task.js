// The live task page: renders the task's snapshot from the WebSocket, then applies each
// numbered delta in place (asking for a fresh snapshot when a number is missing). The server
// computes everything shown (marketplace/task_page.py); this only renders it and merges
// deltas' rows by key, escaping every value. The server renders the first message too, so
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
      ? `<span class="dev" title="${esc(address)}"><strong title="${esc(name)}">${esc(name)}</strong><span class="hash muted">${esc(short(address))}</span></span>`
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

  // The tables, each a list of the message keyed as the server keys a delta's rows
  // (task_page.task_delta_message); a row is rendered the same way whole or in place.
  const TABLES = [
    {
      body: "rounds-body", list: (m) => m.snapshot.rounds_published, key: (r) => r.number, cols: 6,
      empty: "No global model yet.",
      cells: (r) => `<td>${esc(r.number)}</td><td class="num">${pct(r.accuracy)}</td><td class="num">${num(r.loss, 4)}</td><td class="num">${esc(r.updates_aggregated)}</td><td class="wide">${hash(r.global_model_id)}</td><td class="num wide">${esc(r.gas_used ?? "–")}</td>`,
    },
    {
      body: "bids-body", list: (m) => m.snapshot.bids, key: (b) => b.device, cols: 4,
      keep: () => last.view.shown.bids,
      empty: "No bids yet. Devices that fit the task bid while bidding is open.",
      cells: (b) => `<td>${device(b.device)}</td><td><span class="badge role">${esc(b.role)}</span></td><td class="num">${eth(b.price_per_round_wei)} ETH</td><td class="num wide">${esc(b.samples)}</td>`,
    },
    {
      body: "selected-body", list: (m) => m.snapshot.selected, key: (d) => d.role + ":" + d.device, cols: 3,
      empty: "Selected when bidding closes.",
      cells: (d) => `<td>${device(d.device)}</td><td><span class="badge role">${esc(d.role)}${d.position === null || d.position === undefined ? "" : " #" + esc(d.position)}</span></td><td class="num">${eth(d.price_per_round_wei)} ETH</td>`,
    },
    {
      body: "tx-body", list: (m) => m.view.tx_rows, key: (t) => t.tx_hash, cols: 3,
      keep: () => last.view.shown.transactions,
      empty: "No transactions seen yet.",
      cells: (t) => `<td>${esc(t.label)}</td><td class="clip">${hash(t.tx_hash, true, "tx")}</td><td class="num">${esc(t.block_number)}</td>`,
    },
    {
      body: "payouts-body", list: (m) => m.snapshot.payouts, key: (p) => p.tx_hash + ":" + p.log_index, cols: 2,
      empty: "Paid when the task is settled.",
      cells: (p) => `<td>${p.account === last.snapshot.buyer_address ? "<strong>You</strong>" : device(p.account)}</td><td class="num">${eth(p.amount_wei)} ETH<span class="cell-note">${esc(p.reason_label)}</span></td>`,
    },
  ];
  const row = (table, item) => `<tr data-key="${esc(table.key(item))}">${table.cells(item)}</tr>`;
  function fill(table, items) {
    const el = $(table.body);
    if (!el) return;
    el.innerHTML = items.length
      ? items.map((item) => row(table, item)).join("")
      : `<tr><td colspan="${table.cols}" class="empty">${esc(table.empty)}</td></tr>`;
  }
  // A delta's rows replace the rows with their keys, or are added after the others (a delta
  // adds rows in the lists' own order: bids, rounds, transactions, payouts as they come).
  function upsert(table, items) {
    const el = $(table.body);
    if (!el || !items.length) return;
    const empty = el.querySelector("td.empty");
    if (empty) empty.closest("tr").remove();
    const rowsByKey = new Map(Array.from(el.children, (tr) => [tr.dataset.key, tr]));
    const holder = document.createElement("tbody");
    for (const item of items) {
      holder.innerHTML = row(table, item);
      const fresh = holder.firstElementChild;
      const old = rowsByKey.get(fresh.dataset.key);
      if (!old) el.appendChild(fresh);
      else if (old.innerHTML !== fresh.innerHTML) old.replaceWith(fresh);
      rowsByKey.set(fresh.dataset.key, fresh);
    }
    // A table of the latest rows only drops its oldest as new ones come.
    const keep = table.keep ? table.keep() : Infinity;
    while (el.children.length > keep) el.firstElementChild.remove();
    flash(el);
  }
  function drawContributions(v) {
    const head = $("contrib-head");
    if (head) {
      head.innerHTML = `<tr><th>Trainer</th>${(v.contribution_rounds || []).map((r) => `<th class="num">Round ${esc(Number(r) + 1)}</th>`).join("")}<th class="num">Aggregated</th><th class="num">Paid</th></tr>`;
    }
    fill({
      body: "contrib-body", key: (c) => c.trainer, cols: (v.contribution_rounds || []).length + 3,
      empty: "Scored as rounds close.",
      cells: (c) => `<td>${device(c.trainer)}</td>${c.cells.map((cell) => `<td class="num">${esc(cell)}</td>`).join("")}<td class="num">${esc(c.rounds_aggregated)} of ${esc(v.done_rounds)}</td><td class="num">${c.paid_wei === null || c.paid_wei === undefined ? "–" : eth(c.paid_wei) + " ETH"}</td>`,
    }, v.contribution_rows || []);
  }

  // Everything but the tables: state, steps, figures, the chart, the notes.
  function drawTask(msg) {
    const s = msg.snapshot;
    const v = msg.view;
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
    setText("stat-bids", `${s.min_trainers}–${s.max_trainers} wanted · ${s.bid_count} bid${s.bid_count === 1 ? "" : "s"}${s.aggregator ? " · plus the aggregator" : ""}`);

    const latest = (shown, total) => (total > shown ? `the latest ${shown} of ${total} · ` : "");
    setText("tx-note", latest((v.tx_rows || []).length, s.transaction_count));
    setText("bids-note", latest(s.bids.length, s.bid_count));

    drawChart(s.rounds_published);
    drawWait(v.round_wait);
    setText("pay-note", v.pay_note || "");
    const refund = $("refund-note");
    if (refund) {
      refund.innerHTML = v.refunded
        ? `Refunded to you: <strong>${eth(s.refund_wei)} ETH</strong>.`
        : "What is not earned comes back to your wallet.";
    }
  }

  let last = null;
  // The whole task: a snapshot, or the page's first render.
  function render(msg) {
    last = msg;
    names = msg.view.device_names || {};
    drawTask(msg);
    for (const table of TABLES) fill(table, table.list(msg) || []);
    drawContributions(msg.view);
  }

  // ---------------------------------------------------------------- a delta

  // How a delta's rows are merged into the page's copy of the task, by the server's keys.
  const SNAPSHOT_KEYS = {
    bids: (b) => b.device,
    selected: (d) => d.role + ":" + d.device,
    rounds_published: (r) => String(r.number),
    updates: (u) => u.round + ":" + u.trainer,
    transactions: (t) => t.tx_hash + ":" + t.log_index,
    payouts: (p) => p.tx_hash + ":" + p.log_index,
  };
  function mergeRows(list, items, key) {
    const at = new Map(list.map((item, i) => [key(item), i]));
    for (const item of items) {
      const k = key(item);
      if (at.has(k)) list[at.get(k)] = item;
      else { at.set(k, list.length); list.push(item); }
    }
  }
  function mergeContributions(into, rows, keep) {
    const byTrainer = new Map(into.map((c) => [c.trainer, c]));
    for (const c of rows) {
      const old = byTrainer.get(c.trainer);
      if (!old) { into.push(c); byTrainer.set(c.trainer, c); continue; }
      mergeRows(old.rounds, c.rounds, (r) => String(r.round));
      old.rounds.sort((a, b) => a.round - b.round);
      old.rounds.splice(0, Math.max(0, old.rounds.length - keep));
      old.rounds_aggregated = c.rounds_aggregated;
      old.paid_wei = c.paid_wei;
    }
  }
  // The contribution table's rows hold one cell per round of contribution_rounds.
  function mergeContributionRows(v, d) {
    const rounds = Array.from(new Set([...(v.contribution_rounds || []), ...d.contribution_rounds]))
      .sort((a, b) => a - b).slice(-v.shown.contribution_rounds);
    const cells = new Map();
    const paid = new Map();
    const aggregated = new Map();
    for (const [view, list] of [[v, v.contribution_rows || []], [d, d.contribution_rows]]) {
      for (const c of list) {
        const byRound = cells.get(c.trainer) || new Map();
        (view.contribution_rounds || []).forEach((r, i) => byRound.set(r, c.cells[i]));
        cells.set(c.trainer, byRound);
        paid.set(c.trainer, c.paid_wei);
        aggregated.set(c.trainer, c.rounds_aggregated);
      }
    }
    v.contribution_rounds = rounds;
    v.contribution_rows = Array.from(cells, ([trainer, byRound]) => ({
      trainer, cells: rounds.map((r) => byRound.get(r) ?? ""),
      rounds_aggregated: aggregated.get(trainer), paid_wei: paid.get(trainer),
    }));
  }
  function merge(msg, delta) {
    const s = msg.snapshot;
    const v = msg.view;
    const d = delta.view;
    for (const [name, value] of Object.entries(delta.snapshot)) {
      if (SNAPSHOT_KEYS[name]) mergeRows(s[name] = s[name] || [], value, SNAPSHOT_KEYS[name]);
      else if (name === "contributions") mergeContributions(s.contributions = s.contributions || [], value, v.shown.contribution_rounds);
      else s[name] = value;
    }
    s.rounds_published.sort((a, b) => a.number - b.number);
    mergeRows(v.tx_rows = v.tx_rows || [], d.tx_rows || [], (t) => t.tx_hash);
    // The lists that grow with the rounds keep what the server's snapshot would hold.
    v.tx_rows.splice(0, Math.max(0, v.tx_rows.length - v.shown.transactions));
    const kept = new Set(v.tx_rows.map((t) => t.tx_hash));
    s.transactions = s.transactions.filter((t) => kept.has(t.tx_hash));
    s.updates = s.updates.filter((u) => u.round >= s.published_rounds - v.shown.update_rounds);
    s.bids.splice(0, Math.max(0, s.bids.length - v.shown.bids));
    Object.assign(v.device_names = v.device_names || {}, d.device_names || {});
    mergeContributionRows(v, { contribution_rounds: d.contribution_rounds || [], contribution_rows: d.contribution_rows || [] });
    for (const [name, value] of Object.entries(d)) {
      if (!["tx_rows", "device_names", "contribution_rounds", "contribution_rows"].includes(name)) v[name] = value;
    }
  }
  // A change in place: the page's copy merges it, the tables take its rows.
  function apply(delta) {
    merge(last, delta);
    names = last.view.device_names;
    drawTask(last);
    for (const table of TABLES) upsert(table, table.list(delta) || []);
    if ((delta.view.contribution_rows || []).length) drawContributions(last.view);
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
  let seq = null; // the number of the last change shown; none until the socket's snapshot
  let resyncing = false;
  function counted() { root.dataset.updates = String(Number(root.dataset.updates || 0) + 1); }
  function connect() {
    const scheme = location.protocol === "https:" ? "wss://" : "ws://";
    // The live server's own port on this host when it has one, else this page's origin.
    const port = root.dataset.wsPort;
    const host = port ? location.hostname + ":" + port : location.host;
    const ws = new WebSocket(scheme + host + root.dataset.wsPath);
    ws.onmessage = (event) => {
      let msg;
      try { msg = JSON.parse(event.data); } catch (e) { return; }
      if (!msg || !msg.snapshot || !msg.view) return;
      if (msg.type === "task.snapshot") {
        delay = 500; // let in: a socket the server closes at once keeps backing off
        status(true, "live");
        seq = msg.seq;
        resyncing = false;
        render(msg);
        counted();
      } else if (msg.type === "task.delta" && seq !== null && !resyncing && msg.seq > seq) {
        if (msg.seq !== seq + 1) {
          // A change went missing (or crossed another): ask for the whole task again.
          resyncing = true;
          root.dataset.resyncs = String(Number(root.dataset.resyncs || 0) + 1);
          ws.send(JSON.stringify({ type: "resync" }));
          return;
        }
        seq = msg.seq;
        apply(msg);
        counted();
      }
    };
    ws.onclose = (event) => {
      seq = null;
      // 4403: this browser's session no longer lets it follow the task (logged out, password
      // changed elsewhere); it keeps trying, and follows on once logged in again.
      status(false, event.code === 4403 ? "not signed in: log in again to follow live" : "reconnecting…");
      setTimeout(connect, delay);
      delay = Math.min(delay * 2, 10000);
    };
  }

  // The server rendered everything but the chart, which is drawn here from the points the
  // page holds (task_page.page_start) until the socket brings the whole task.
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
  window.FlexTask = { render, apply, chart, message: () => last };
  connect();
})();
