// The task form's live cost estimate: asks the server as the shape of the task changes
// (wei, shown in ETH by units.js).
(function () {
  "use strict";
  const form = document.getElementById("task-form");
  if (!form) return;
  // Not form.dataset: a form exposes its fields as properties, and one is named "dataset".
  const url = form.getAttribute("data-estimate-url");
  const names = ["rounds", "min_trainers", "max_trainers"];
  const out = (id, text) => { const el = document.getElementById(id); if (el) el.textContent = text; };
  let timer = null;
  let seq = 0;

  async function refresh() {
    const params = new URLSearchParams();
    for (const name of names) {
      const input = form.elements[name];
      if (input && input.value) params.set(name, input.value);
    }
    const mine = ++seq;
    try {
      const res = await fetch(url + "?" + params.toString(), { headers: { Accept: "application/json" } });
      if (mine !== seq) return;
      const est = await res.json();
      // A shape the form refuses gets no estimate: say why instead.
      document.getElementById("est-body").classList.toggle("hidden", !res.ok);
      document.getElementById("est-problem").classList.toggle("hidden", res.ok);
      if (!res.ok) { out("est-problem", est.message || "No estimate right now."); return; }
      out("est-low", FlexUnits.eth(est.low_wei));
      out("est-high", FlexUnits.eth(est.high_wei));
      out("est-minimum", FlexUnits.eth(est.minimum_wei));
      out("est-gas", FlexUnits.ethApprox(est.gas_wei));
      out("est-task-gas", FlexUnits.ethApprox(est.task_gas_wei));
      out("est-basis", est.basis);
    } catch (e) { /* keep the last estimate; the server checks the budget anyway */ }
  }

  for (const name of names) {
    const input = form.elements[name];
    if (input) input.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(refresh, 250); });
  }

  // Each catalogue model has hyper-parameters that train it well: choosing it sets them.
  const presets = JSON.parse((document.getElementById("model-presets") || {}).textContent || "{}");
  const model = form.elements.model;
  if (model) {
    model.addEventListener("change", () => {
      const preset = presets[model.value];
      if (!preset) return;
      for (const [name, value] of Object.entries(preset)) {
        if (form.elements[name]) form.elements[name].value = value;
      }
    });
  }

  // One click, one transaction: the chain call takes a moment.
  form.addEventListener("submit", () => {
    const button = document.getElementById("submit-task");
    if (button) { button.disabled = true; button.textContent = "Sending to the chain…"; }
  });
})();
