// pgflow dashboard: live updates. Every 3 s, while the "live" box is checked, the
// tab is visible and no form field has the focus, the page is fetched again and
// its live region replaced (the server renders; this only swaps HTML it made).
(function () {
  "use strict";
  var box = document.getElementById("live");
  var region = document.getElementById("live-region");
  if (!box || !region) { return; }
  try { box.checked = localStorage.getItem("pgflow-live") !== "off"; } catch (e) { /* storage off */ }
  box.addEventListener("change", function () {
    try { localStorage.setItem("pgflow-live", box.checked ? "on" : "off"); } catch (e) { /* storage off */ }
  });
  var busy = false;
  function refresh() {
    if (busy || !box.checked || document.visibilityState !== "visible") { return; }
    var focused = document.activeElement;
    if (focused && region.contains(focused) && /INPUT|SELECT|TEXTAREA|BUTTON/.test(focused.tagName)) { return; }
    busy = true;
    fetch(location.href, { headers: { "X-Pgflow-Fragment": "1" }, credentials: "same-origin" })
      .then(function (r) { return r.ok ? r.text() : null; })
      .then(function (html) { if (html !== null) { region.innerHTML = html; } })
      .catch(function () { /* the server is away: try again next time */ })
      .then(function () { busy = false; });
  }
  setInterval(refresh, 3000);
})();
