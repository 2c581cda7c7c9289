"""`python -m consumer.fake_llm --port 8089`."""

import sys

from consumer.fake_llm.cli import main

sys.exit(main())
