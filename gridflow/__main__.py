from gridflow.cli import main

main()
