"""serve — ``vilex serve``: an interactive page to see ViLex work (reconstruct, compose, ask), built with gradio.

It sits on top of every other package (``vilex`` <- ``vlm`` <- ``benchmarks`` <- ``toy`` <- ``serve``): the page
needs the ViLex pipeline, the VLMs, and the toy world for its gallery of held-out scenes. Modules, read in this order:

* ``models.py``   which checkpoints to serve (the shipped toy assets by default), checked before anything loads;
* ``gallery.py``  held-out toy scenes to pick from;
* ``handlers.py`` what every control does, as plain functions (no gradio: the tests call them directly);
* ``app.py``      the gradio layout and its events (the only module that imports gradio);
* ``cli.py``      the ``vilex serve`` command.
"""
