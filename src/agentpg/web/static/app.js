// agentpg explorer: a little progressive enhancement. Every page works without it.
"use strict";

(function () {
  function onReady(fn) {
    if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", fn);
    else fn();
  }

  // Ctrl/Cmd+Enter in the SQL box runs the statement.
  function sqlShortcut() {
    var box = document.getElementById("sql");
    if (!box) return;
    box.addEventListener("keydown", function (event) {
      if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
        event.preventDefault();
        if (box.form) box.form.requestSubmit();
      }
    });
  }

  // <select data-autosubmit> submits its form on change; its fallback button is hidden.
  function autoSubmit() {
    document.querySelectorAll("select[data-autosubmit]").forEach(function (select) {
      select.addEventListener("change", function () { if (select.form) select.form.submit(); });
    });
    document.querySelectorAll(".js-hide").forEach(function (el) { el.hidden = true; });
  }

  // A search box that hides the table cards whose name does not contain the text.
  function tableFilter() {
    var input = document.getElementById("table-filter");
    if (!input) return;
    input.closest(".filter-row").hidden = false;
    var cards = document.querySelectorAll(input.getAttribute("data-filter"));
    input.addEventListener("input", function () {
      var needle = input.value.trim().toLowerCase();
      cards.forEach(function (card) {
        var name = (card.getAttribute("data-name") || "").toLowerCase();
        card.hidden = needle !== "" && name.indexOf(needle) === -1;
      });
    });
  }

  // Permission rows are saved in place: same POST as without script, but answered in JSON.
  function permissionForms() {
    document.querySelectorAll("form.perm-form").forEach(function (form) {
      var status = form.querySelector(".perm-status");
      var button = form.querySelector("button");
      form.addEventListener("submit", function (event) {
        event.preventDefault();
        var body = new URLSearchParams(new FormData(form));
        button.disabled = true;
        status.className = "perm-status";
        status.textContent = "Saving…";
        fetch(form.action, {
          method: "POST", body: body, credentials: "same-origin",
          headers: { "Accept": "application/json" }
        }).then(function (response) {
          return response.json().then(function (payload) { return { ok: response.ok, payload: payload }; });
        }).then(function (answer) {
          if (!answer.ok) throw new Error(answer.payload.detail || "could not save");
          var perms = answer.payload.permissions;
          ["can_read", "can_write", "can_create_tables", "can_drop_tables"].forEach(function (flag) {
            var box = document.getElementById(form.id + "-" + flag);
            if (box) box.checked = !!perms[flag];
          });
          var allowed = document.getElementById(form.id + "-allowed");
          if (allowed) allowed.value = perms.allowed_tables ? perms.allowed_tables.join(", ") : "";
          status.classList.add("ok");
          status.textContent = "Saved";
        }).catch(function (error) {
          status.classList.add("bad");
          status.textContent = error.message;
        }).finally(function () {
          button.disabled = false;
        });
      });
    });
  }

  onReady(function () {
    sqlShortcut();
    autoSubmit();
    tableFilter();
    permissionForms();
  });
})();
