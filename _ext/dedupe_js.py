"""Drop inline scripts Sphinx 7.4 emits twice (each page threw 'THEBE_JS_URL already declared').

Upstream fix: sphinx-doc/sphinx PR #13402, only in Sphinx 8.x, which Jupyter Book 1 cannot use.
"""


def _dedupe(app, pagename, templatename, context, doctree):
    seen, unique = set(), []
    for script in context.get("script_files", []):
        key = (script.filename or "", script.priority, tuple(sorted(script.attributes.items())))
        if key not in seen:
            seen.add(key)
            unique.append(script)
    context["script_files"] = unique


def setup(app):
    app.connect("html-page-context", _dedupe)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
