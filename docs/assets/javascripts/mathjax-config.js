// MathJax 3 for pymdownx.arithmatex (generic mode): typeset only what arithmatex marked, from the copy of
// MathJax this site ships in assets/mathjax/ (no CDN).
window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"]],
    displayMath: [["\\[", "\\]"]],
    processEscapes: true,
    processEnvironments: true,
  },
  options: {
    ignoreHtmlClass: ".*|",
    processHtmlClass: "arithmatex",
  },
};

// MathJax typesets the page it is loaded on by itself. Material's instant navigation (not enabled in mkdocs.yml)
// would swap pages without a reload: typeset those. Skipping the first emission matters: clearing MathJax's
// caches after its own first typeset drops the CSS of every glyph, and the math turns invisible.
if (typeof document$ !== "undefined") {
  let first = true;
  document$.subscribe(() => {
    if (first) {
      first = false;
      return;
    }
    if (window.MathJax && MathJax.typesetPromise) {
      MathJax.startup.output.clearCache();
      MathJax.typesetClear();
      MathJax.texReset();
      MathJax.typesetPromise();
    }
  });
}
