/* Keyboard shortcuts for the console (vendored, no framework; loaded with `defer`, no inline
   script, so the CSP can forbid inline code).

   Any element with data-key="x" is activated when "x" is pressed: a button is clicked (its form
   submits with the button's name/value), a link is followed. "?" toggles the help panel.
   Keys typed into form fields are left alone. */
(function () {
  "use strict";

  function typing(target) {
    if (!target || !target.tagName) { return false; }
    var tag = target.tagName.toLowerCase();
    return tag === "input" || tag === "textarea" || tag === "select" || target.isContentEditable;
  }

  function toggleHelp() {
    var help = document.getElementById("shortcuts-help");
    if (help) { help.hidden = !help.hidden; }
  }

  document.addEventListener("keydown", function (event) {
    if (event.altKey || event.ctrlKey || event.metaKey) { return; }
    if (event.key === "Escape") {
      if (typing(event.target)) { event.target.blur(); }
      var help = document.getElementById("shortcuts-help");
      if (help) { help.hidden = true; }
      return;
    }
    if (typing(event.target)) { return; }
    if (event.key === "?") { event.preventDefault(); toggleHelp(); return; }
    var key = event.key.length === 1 ? event.key.toLowerCase() : "";
    if (!key) { return; }
    var element = document.querySelector('[data-key="' + key + '"]');
    if (!element || element.disabled) { return; }
    event.preventDefault();
    if (element.tagName.toLowerCase() === "a") {
      window.location.assign(element.href);
    } else {
      /* Guard against a double submission when a key is held down. */
      if (element.form && element.form.dataset.submitted === "1") { return; }
      if (element.form) { element.form.dataset.submitted = "1"; }
      element.click();
    }
  });
}());
