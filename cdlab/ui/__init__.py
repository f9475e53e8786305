"""The logic behind ``app.py``: everything the Gradio app does, importable and testable without Gradio.

    compare.py       the Compare tab: one noise, one text encoding, teacher / students as columns
    jobs.py          the training job manager (the trainer runs as a subprocess)
    runs.py          reading run directories: metrics, loss plot, previews, status
    evaluate_tab.py  the Evaluate tab: newest / earlier evaluations, launching one
    hosting.py       Spaces helpers: ``spaces.GPU`` wrapping, training gate, launch settings
    session.py       choosing and loading the teacher, the header line
    bench.py         ``python -m cdlab.ui.bench``: the Compare speed benchmark

Nothing here imports gradio, torch or diffusers at module import time.
"""
