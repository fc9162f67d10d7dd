"""`python -m comfyui_flux_schnell`: the same command line as `flux-schnell`."""

import sys

from .cli import main

sys.exit(main())
