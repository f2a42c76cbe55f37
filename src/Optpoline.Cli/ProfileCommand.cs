using System.Globalization;
using Optpoline.Profiles;

namespace Optpoline.Cli;

/// <summary><c>optpoline profile merge|show</c>: combine saved profiles, or print one.</summary>
internal static class ProfileCommand
{
    public static int Run(string[] args, TextWriter output, TextWriter error)
    {
        if (args.Length == 0)
        {
            return Program.Fail(error, "profile needs a verb: merge or show.");
        }

        try
        {
            switch (args[0])
            {
                case "merge":
                    return Merge(args[1..], output, error);
                case "show" when args.Length == 2:
                    Show(LearnedProfile.Load(args[1]), output);
                    return ExitCodes.Ok;
                default:
                    return Program.Fail(error, $"unknown or incomplete profile command: {string.Join(' ', args)}");
            }
        }
        catch (ProfileException e)
        {
            error.WriteLine($"optpoline: {e.Message}");
            return ExitCodes.BadInput;
        }
    }

    /// <summary><c>merge -o OUT IN...</c>: the sum of the inputs' counts, per site and target.</summary>
    private static int Merge(string[] args, TextWriter output, TextWriter error)
    {
        var at = Array.IndexOf(args, "-o");
        if (at < 0 || at + 1 >= args.Length)
        {
            return Program.Fail(error, "profile merge needs -o OUT.");
        }

        var inputs = args.Where((_, i) => i != at && i != at + 1).ToList();
        if (inputs.Count == 0)
        {
            return Program.Fail(error, "profile merge needs at least one input profile.");
        }

        var merged = LearnedProfile.Merge(inputs.Select(LearnedProfile.Load));
        merged.Save(args[at + 1]);
        output.WriteLine(string.Create(CultureInfo.InvariantCulture, $"merged {inputs.Count} profiles into {args[at + 1]}: {merged.Sites.Count} sites, {merged.Sites.Values.Sum(t => t.Count)} targets"));
        return ExitCodes.Ok;
    }

    private static void Show(LearnedProfile profile, TextWriter output)
    {
        foreach (var (site, targets) in profile.Sites)
        {
            var total = Math.Max(1, targets.Sum(t => t.Count));
            output.WriteLine(string.Create(CultureInfo.InvariantCulture, $"{site}: {total} samples"));
            foreach (var target in targets)
            {
                output.WriteLine(string.Create(CultureInfo.InvariantCulture, $"  {100.0 * target.Count / total,6:F1} %  {target.Count,8}  {target}"));
            }
        }
    }
}
