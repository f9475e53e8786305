"""The app behind ``app.py``: one module per tab, its logic (testable without Gradio) beside its builder.

    compare.py       the Compare logic: micro-batching, the teacher columns' cache, streaming (students first)
    compare_result.py  what a Compare request returns: each column's result, the whole (or partial) comparison
    compare_view.py  how a Compare result is shown: the row of labelled columns, the trajectory grid, the PNG
    compare_tab.py   the Compare tab (layout and events)
    edit_inputs.py   the Edit tab's fields checked, the image editor's value turned into an image and a mask
    edit_tab.py      the Edit tab: presets, one edit in every column, the result's layout, the tab
    train_tab.py     the Train tab: one poll of a run, the form, the tab
    jobs.py          the training job manager (the trainer runs as a subprocess)
    runs.py          reading run directories: metrics, loss plot data, status
    previews.py      a run's preview rows composed into one labelled image
    evaluate_tab.py  the Evaluate tab: newest / earlier evaluations, launching one, the tab
    session.py       the page: loading the teacher, the header, errors on the page, the page load, the ready signal
    hosting.py       hosting policy: public hosts, the training gate, what is served, ``spaces.GPU``
    bench.py         ``python -m cdlab.ui.bench``: the Compare benchmarks, and the scratch app and random
                     students they (and the client and browser tests) run against

Gradio is imported only when a page is built (a tab's builder), never when a module is imported.
"""
