// Wei as people read it in ETH: the browser's copy of core/units.py (wei_to_eth and
// wei_to_eth_approx). Exact: BigInt, never a float. Anything that is not a whole number of
// wei shows as "" (as the template filters do), never as a guess.
(function () {
  "use strict";
  const WEI = 10n ** 18n;

  function parse(wei) {
    if (wei === null || wei === undefined || wei === "") return null;
    try { return BigInt(wei); } catch (e) { return null; }
  }

  function format(n) {
    const sign = n < 0n ? "-" : "";
    if (n < 0n) n = -n;
    const frac = (n % WEI).toString().padStart(18, "0").replace(/0+$/, "");
    return sign + (n / WEI).toString() + (frac ? "." + frac : "");
  }

  // "1500000000000000000" -> "1.5"
  function eth(wei) {
    const n = parse(wei);
    return n === null ? "" : format(n);
  }

  // Rounded up to `digits` significant digits, for estimates (gas) only.
  function ethApprox(wei, digits = 3) {
    const n = parse(wei);
    if (n === null) return "";
    if (n <= 0n) return format(n);
    const len = n.toString().length;
    const unit = 10n ** BigInt(Math.max(len - digits, 0));
    return format(((n + unit - 1n) / unit) * unit);
  }

  window.FlexUnits = { eth, ethApprox };
})();
