from ling_surgery.cli import main

main()
