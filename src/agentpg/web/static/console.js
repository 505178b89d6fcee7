// agentpg explorer console: the usage chart (Chart.js) and the schema picture (Cytoscape.js), both vendored
// in this folder. Each draws from the table or lists the page already shows (the text alternative), so the
// page says everything without script; no inline code, no inline style (the CSP stays strict).
"use strict";

(function () {
  function onReady(fn) {
    if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", fn);
    else fn();
  }

  function cssVar(name, fallback) {
    var value = getComputedStyle(document.documentElement).getPropertyValue(name).trim();
    return value || fallback;
  }

  var reducedMotion = window.matchMedia && window.matchMedia("(prefers-reduced-motion: reduce)").matches;

  // -- usage over time --------------------------------------------------------------------------------------

  function usageChart() {
    var canvas = document.getElementById("usage-chart");
    var rows = document.querySelectorAll("#usage-history tbody tr[data-day]");
    if (!canvas || !rows.length || typeof window.Chart === "undefined") return;
    var days = [], dollars = [], mebibytes = [];
    rows.forEach(function (row) {
      days.push(row.getAttribute("data-day"));
      dollars.push(Number(row.getAttribute("data-cost-cents")) / 100);
      mebibytes.push(Math.round(Number(row.getAttribute("data-storage-bytes")) / 1048576 * 100) / 100);
    });
    var fg = cssVar("--fg", "#1d2330"), muted = cssVar("--muted", "#5b6475"), line = cssVar("--line", "#d9dee7");
    var accent = cssVar("--accent", "#1f5fa8"), ok = cssVar("--ok", "#1e6b35");
    var chart = new window.Chart(canvas, {
      data: {
        labels: days,
        datasets: [
          { type: "bar", label: "Cost that day ($)", data: dollars, yAxisID: "cost", backgroundColor: accent,
            borderColor: accent, order: 2 },
          { type: "line", label: "Storage (MiB)", data: mebibytes, yAxisID: "storage", borderColor: ok,
            backgroundColor: ok, pointRadius: days.length > 60 ? 0 : 3, tension: 0.2, order: 1 }
        ]
      },
      options: {
        responsive: true, maintainAspectRatio: false, animation: reducedMotion ? false : { duration: 300 },
        interaction: { mode: "index", intersect: false },
        color: fg,
        plugins: { legend: { labels: { color: fg } } },
        scales: {
          x: { ticks: { color: muted, maxRotation: 0, autoSkip: true }, grid: { color: line } },
          cost: { position: "left", beginAtZero: true, title: { display: true, text: "$ per day", color: muted },
                  ticks: { color: muted }, grid: { color: line } },
          storage: { position: "right", beginAtZero: true, title: { display: true, text: "MiB", color: muted },
                     ticks: { color: muted }, grid: { drawOnChartArea: false } }
        }
      }
    });
    canvas.setAttribute("data-points", String(chart.data.labels.length));
  }

  // -- schema picture -------------------------------------------------------------------------------------

  function schemaGraph() {
    var box = document.getElementById("schema-graph");
    if (!box || typeof window.cytoscape === "undefined") return;
    // Cytoscape adds a <style> element (position: relative for its container) unless an element with this id
    // exists; under the strict CSP that inline style would be refused (and reported). app.css positions the
    // container instead, and this placeholder tells Cytoscape not to try.
    if (!document.getElementById("__________cytoscape_stylesheet")) {
      var mark = document.createElement("meta");
      mark.id = "__________cytoscape_stylesheet";
      document.head.appendChild(mark);
    }
    var elements = [], names = {};
    document.querySelectorAll("#schema-tables li[data-table]").forEach(function (li) {
      var name = li.getAttribute("data-table");
      names[name] = true;
      elements.push({ group: "nodes", data: { id: "t:" + name, label: name,
                                              width: Math.max(70, name.length * 8 + 24) } });
    });
    var edges = 0;
    document.querySelectorAll("#schema-keys li[data-from]").forEach(function (li, i) {
      var from = li.getAttribute("data-from"), to = li.getAttribute("data-to");
      if (!names[to]) {  // a table of another schema: drawn, marked as outside this list
        names[to] = true;
        elements.push({ group: "nodes", classes: "external", data: { id: "t:" + to, label: to,
                                                                    width: Math.max(70, to.length * 8 + 24) } });
      }
      edges += 1;
      elements.push({ group: "edges", data: { id: "k:" + i, source: "t:" + from, target: "t:" + to,
                                              label: li.getAttribute("data-name") } });
    });
    var fg = cssVar("--fg", "#1d2330"), card = cssVar("--card", "#fff"), accent = cssVar("--accent", "#1f5fa8");
    var muted = cssVar("--muted", "#5b6475"), bg = cssVar("--accent-bg", "#e8f0fb");
    var cy = window.cytoscape({
      container: box,
      elements: elements,
      wheelSensitivity: 0.3,
      style: [
        { selector: "node", style: { "shape": "round-rectangle", "label": "data(label)", "width": "data(width)",
                                     "height": 30, "text-valign": "center", "text-halign": "center",
                                     "font-size": 13, "color": fg, "background-color": bg, "border-width": 1.5,
                                     "border-color": accent } },
        { selector: "node.external", style: { "border-style": "dashed", "background-color": card } },
        { selector: "edge", style: { "width": 1.5, "line-color": muted, "target-arrow-color": muted,
                                     "target-arrow-shape": "triangle", "curve-style": "bezier" } }
      ],
      layout: edges ? { name: "breadthfirst", directed: true, spacingFactor: 1.1, padding: 20, animate: false }
                    : { name: "grid", padding: 20, animate: false }
    });
    // Fit the whole graph, but never blow a small schema up to giant boxes.
    function fit() {
      cy.fit(undefined, 20);
      if (cy.zoom() > 1.25) { cy.zoom(1.25); cy.center(); }
    }
    fit();
    box.addEventListener("keydown", function (event) {
      var step = 40, handled = true;
      if (event.key === "ArrowLeft") cy.panBy({ x: step, y: 0 });
      else if (event.key === "ArrowRight") cy.panBy({ x: -step, y: 0 });
      else if (event.key === "ArrowUp") cy.panBy({ x: 0, y: step });
      else if (event.key === "ArrowDown") cy.panBy({ x: 0, y: -step });
      else if (event.key === "+" || event.key === "=") cy.zoom({ level: cy.zoom() * 1.2, renderedPosition: center() });
      else if (event.key === "-") cy.zoom({ level: cy.zoom() / 1.2, renderedPosition: center() });
      else if (event.key === "0") fit();
      else handled = false;
      if (handled) event.preventDefault();
    });
    function center() { return { x: box.clientWidth / 2, y: box.clientHeight / 2 }; }
    box.setAttribute("data-nodes", cy.nodes().map(function (n) { return n.data("label"); }).sort().join(","));
    box.setAttribute("data-edges", String(cy.edges().length));
  }

  onReady(function () {
    usageChart();
    schemaGraph();
  });
})();
