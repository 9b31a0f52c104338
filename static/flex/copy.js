// Copy buttons beside addresses, hashes and model IDs: one listener for the whole page, so
// rows the live task page renders later get it too.
(function () {
  "use strict";
  document.addEventListener("click", (event) => {
    const button = event.target.closest("button.copy[data-copy]");
    if (!button) return;
    const done = (text) => {
      button.textContent = text;
      setTimeout(() => { button.textContent = "copy"; }, 1500);
    };
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(button.dataset.copy).then(() => done("copied"), () => done("press Ctrl+C"));
    } else {
      done("select to copy");
    }
  });
})();
