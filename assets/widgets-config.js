// bnbook: make @jupyter-widgets/html-manager work from local files (no CDN), with MathJax 3.
// Loaded by myst-nb on pages with widgets, after require.js and before embed-amd.js
// (see nb_ipywidgets_js in _config.yml).
(function () {
  "use strict";
  var src = document.currentScript && document.currentScript.src;
  if (!src || typeof window.require === "undefined") {
    return;
  }
  // The bundle computes the URL of its Font Awesome fonts from the AMD module URI of
  // "@jupyter-widgets/html-manager/dist/libembed-amd" (and of base/controls); mapping those
  // module names onto the folder that holds embed-amd.js and the fonts makes the fonts load.
  var widgets = src.split("?")[0].replace(/\/[^/]*$/, "/") + "widgets";
  window.require.config({
    paths: {
      "@jupyter-widgets/html-manager/dist": widgets,
      "@jupyter-widgets": widgets,
    },
  });
  // The widgets typeset their labels with the MathJax 2 API (MathJax.Hub.Queue) whenever a
  // global MathJax exists; the book loads MathJax 3, so give it that one call.
  document.addEventListener("DOMContentLoaded", function () {
    var mj = window.MathJax;
    if (!mj || mj.Hub) {
      return;
    }
    mj.Hub = {
      Queue: function () {
        Array.prototype.forEach.call(arguments, function (job) {
          var element = Array.isArray(job) ? job[2] : null;
          if (element && mj.startup && mj.startup.promise) {
            mj.startup.promise.then(function () {
              return mj.typesetPromise([element]);
            });
          }
        });
      },
    };
  });
})();
