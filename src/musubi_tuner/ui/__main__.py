from musubi_tuner.ui.server import main

main()
