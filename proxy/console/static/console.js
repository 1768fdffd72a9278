// pixazo-proxy console: draws the spend charts (uPlot) from the JSON each chart figure carries (data-chart).
// No inline script anywhere (the Content-Security-Policy forbids it); htmx swaps content in, and
// htmx:load runs this again for what it brought.
(function () {
  "use strict";
  var COLOURS = ["#2457c5", "#d9822b", "#1f7a3a", "#8e44ad", "#b3261e", "#16a2b8", "#6c757d"];

  function usd(value) { return value == null ? "" : "$" + value.toFixed(2); }

  function draw(figure) {
    if (figure.dataset.drawn || typeof uPlot === "undefined") { return; }
    var target = figure.querySelector(".plot");
    if (!target || !figure.dataset.chart) { return; }
    var chart = JSON.parse(figure.dataset.chart);
    figure.dataset.drawn = "1";
    if (!chart.series.length) { target.textContent = "Nothing was spent in " + chart.period + "."; return; }
    // Stacked bars: series n is models 0..n summed (exact micro-dollars, shown as dollars), drawn largest first.
    var running = chart.days.map(function () { return 0; });
    var data = [chart.days];
    var series = [{}];
    chart.series.forEach(function (line, n) {
      running = running.map(function (sum, i) { return sum + line.micros[i]; });
      data.push(running.map(function (micros) { return micros / 1e6; }));
      series.push({ label: line.label, fill: COLOURS[n % COLOURS.length], stroke: COLOURS[n % COLOURS.length],
                    paths: uPlot.paths.bars({ size: [0.7, 40] }), points: { show: false },
                    value: function (u, v, s, i) { return i == null ? "" : usd(line.micros[i] / 1e6); } });
    });
    // uPlot draws series in order: draw the tallest stack first so each smaller one shows on top of it.
    var order = series.slice(1).map(function (_, n) { return n + 1; }).reverse();
    var ordered = [data[0]].concat(order.map(function (n) { return data[n]; }));
    var orderedSeries = [{}].concat(order.map(function (n) { return series[n]; }));
    var width = Math.max(320, Math.min(target.clientWidth || figure.clientWidth || 900, 1300));
    new uPlot({ width: width, height: 220, series: orderedSeries, scales: { x: { time: true } },
                axes: [{}, { values: function (u, ticks) { return ticks.map(function (t) { return "$" + t; }); } }],
                legend: { live: true } }, ordered, target);
  }

  function drawAll(root) {
    (root || document).querySelectorAll("figure.chart").forEach(draw);
  }

  document.addEventListener("DOMContentLoaded", function () { drawAll(document); });
  document.addEventListener("htmx:load", function (event) { drawAll(event.target); });
})();
