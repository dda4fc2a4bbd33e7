import sys

from rasa_lora.cli import main

sys.exit(main())
