"""`python -m services.lipsync` starts the lipsync service."""
from .service import main

main()
