import sys

from keras_paligemma2.cli import main

sys.exit(main())
