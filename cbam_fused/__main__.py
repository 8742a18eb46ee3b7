"""python -m cbam_fused: the installation report and self-test (cbam_fused/info.py)."""
import sys

from .info import main

sys.exit(main())
